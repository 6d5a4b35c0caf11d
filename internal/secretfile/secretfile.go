// Package secretfile reads files that hold secrets (PINs, DSNs with passwords, secret
// keys) and refuses those that others could read. It touches only the file it is given.
package secretfile

import (
	"fmt"
	"io"
	"os"
	"slices"
	"syscall"
)

// Read returns the contents of name, at most max bytes. It refuses a file that is not a
// regular file, that others may read or write, or that its group may write; group read is
// allowed only when the file's group is one of this process's groups (Kubernetes mounts a
// Secret for a non-root container as root:fsGroup with group read, and that group is the
// pod's own). The mode is checked on the open file, so a swap after the check cannot pass.
func Read(name string, max int64) ([]byte, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", name)
	}
	if perm := fi.Mode().Perm(); perm&0o037 != 0 || (perm&0o040 != 0 && !ownGroup(fi)) {
		return nil, fmt.Errorf("%s has mode %#o, readable by group or others; run chmod 600 %s", name, uint32(perm), name)
	}
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("%s is larger than %d bytes, too large to be what it should hold", name, max)
	}
	return b, nil
}

func ownGroup(fi os.FileInfo) bool {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return false
	}
	if int(st.Gid) == os.Getgid() {
		return true
	}
	groups, _ := os.Getgroups()
	return slices.Contains(groups, int(st.Gid))
}
