package redistest

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// ForMain starts one redis-server for a whole test binary, for code that
// has no testing.TB: a package's Example functions, from its TestMain.
// stop kills it and removes its directory.
func ForMain() (addr string, stop func(), err error) {
	path, err := lookServer()
	if err != nil {
		return "", nil, err
	}
	dir, err := os.MkdirTemp("", "redistest-")
	if err != nil {
		return "", nil, err
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		os.RemoveAll(dir)
		return "", nil, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	addr = "127.0.0.1:" + strconv.Itoa(port)
	args := serverArgs(path, strconv.Itoa(port), dir, filepath.Join(dir, "redis.log"))
	cmd := exec.Command(args[0], args[1:]...)
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return "", nil, fmt.Errorf("redistest: starting redis-server: %w", err)
	}
	stop = func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		os.RemoveAll(dir)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if err := ping(addr, nil); err == nil {
			return addr, stop, nil
		} else if time.Now().After(deadline) {
			stop()
			return "", nil, fmt.Errorf("redistest: redis-server on %s did not answer in 10s: %w", addr, err)
		}
	}
}

// Main is a TestMain for a package whose examples need Redis: it starts
// one redis-server (ForMain), puts its address in *addr, runs the tests
// and examples, and exits with their code.
func Main(m *testing.M, addr *string) {
	a, stop, err := ForMain()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	*addr = a
	code := m.Run()
	stop()
	os.Exit(code)
}
