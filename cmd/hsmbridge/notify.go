package main

import (
	"log/slog"
	"net"
	"os"
	"strconv"
	"time"
)

// systemd's notify protocol (sd_notify(3)), with the standard library: a datagram to
// $NOTIFY_SOCKET. Outside systemd the socket is unset and these do nothing.

func sdNotify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	if path[0] == '@' { // an abstract socket
		path = "\x00" + path[1:]
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer conn.Close()
	_, err = conn.Write([]byte(state))
	return err
}

// notifyReady tells systemd the daemon serves: every cluster's pool is up by then.
func notifyReady(log *slog.Logger) {
	if err := sdNotify("READY=1"); err != nil {
		log.Warn("sd_notify READY failed", "err", err)
	}
}

func notifyStopping() { _ = sdNotify("STOPPING=1") }

// startWatchdog pings systemd's watchdog at half the interval it asks for ($WATCHDOG_USEC),
// while the daemon's run loop is alive; a hung process stops pinging and is restarted.
// It returns the function that stops the pings.
func startWatchdog(log *slog.Logger) (stop func()) {
	usec, err := strconv.ParseInt(os.Getenv("WATCHDOG_USEC"), 10, 64)
	if err != nil || usec <= 0 {
		return func() {}
	}
	if pid := os.Getenv("WATCHDOG_PID"); pid != "" && pid != strconv.Itoa(os.Getpid()) {
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(time.Duration(usec) * time.Microsecond / 2)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				if err := sdNotify("WATCHDOG=1"); err != nil {
					log.Warn("sd_notify WATCHDOG failed", "err", err)
				}
			}
		}
	}()
	return func() { close(done) }
}
