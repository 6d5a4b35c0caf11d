package bench

import (
	"os/exec"
	"syscall"
)

// dieWithParent makes the child get SIGTERM if the test process dies first, so no daemon
// outlives an interrupted run.
func dieWithParent(c *exec.Cmd) {
	c.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
}
