// Package redistest starts private Redis servers for tests: each test gets
// its own redis-server on a free loopback port, so tests can kill and
// restart it, and never see each other's keys or asynq queues. Start runs
// one server, StartTLS one that speaks only TLS, StartSentinel a master,
// its replica and three Sentinels, StartCluster a Redis Cluster; every
// process keeps its data in the test's temporary directory and is killed
// when the test ends.
package redistest

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Server is a redis-server process owned by a test.
type Server struct {
	Addr string
	Dir  string
	tb   testing.TB
	args []string
	cmd  *exec.Cmd
	tls  *tls.Config // for a server that speaks only TLS
	logf string      // its log file
}

// Start runs redis-server (found on PATH, or REDIS_SERVER) on a free port
// with its data in a temporary directory, and stops it when the test ends.
// extra are added to the command line, e.g. "--appendonly", "yes".
func Start(tb testing.TB, extra ...string) *Server {
	tb.Helper()
	return startOn(tb, freePort(tb), extra...)
}

// startOn is Start on a given port.
func startOn(tb testing.TB, port int, extra ...string) *Server {
	tb.Helper()
	s := &Server{Addr: "127.0.0.1:" + strconv.Itoa(port), Dir: tb.TempDir(), tb: tb}
	s.logf = filepath.Join(s.Dir, "redis.log")
	s.args = append(serverArgs(serverPath(tb), portOf(s.Addr), s.Dir, s.logf), extra...)
	s.start()
	tb.Cleanup(s.Kill)
	return s
}

// serverArgs is the command line of a private, unpersisted redis-server.
func serverArgs(bin, port, dir, logfile string) []string {
	return []string{bin, "--bind", "127.0.0.1", "--port", port, "--dir", dir,
		"--save", "", "--appendonly", "no", "--protected-mode", "no", "--logfile", logfile}
}

// serverPath finds redis-server: REDIS_SERVER, or on PATH.
func serverPath(tb testing.TB) string {
	tb.Helper()
	path, err := lookServer()
	if err != nil {
		tb.Fatal(err)
	}
	return path
}

func lookServer() (string, error) {
	bin := os.Getenv("REDIS_SERVER")
	if bin == "" {
		bin = "redis-server"
	}
	path, err := exec.LookPath(bin)
	if err != nil {
		return "", fmt.Errorf("redistest: %s not found (apt-get install redis-server, or set REDIS_SERVER): %w", bin, err)
	}
	return path, nil
}

func (s *Server) start() {
	s.tb.Helper()
	s.cmd = exec.Command(s.args[0], s.args[1:]...)
	if err := s.cmd.Start(); err != nil {
		s.tb.Fatalf("redistest: starting redis-server: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if err := ping(s.Addr, s.tls); err == nil {
			return
		} else if time.Now().After(deadline) {
			s.tb.Fatalf("redistest: redis-server on %s did not answer in 10s: %v; log:\n%s", s.Addr, err, s.log())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Running reports whether the process is running (not killed).
func (s *Server) Running() bool { return s.cmd != nil }

// Kill stops the server at once (SIGKILL), as a crash would.
func (s *Server) Kill() {
	if s.cmd != nil && s.cmd.Process != nil {
		_ = s.cmd.Process.Kill()
		_ = s.cmd.Wait()
		s.cmd = nil
	}
}

// Restart kills the server and starts it again on the same port and
// directory: what it kept depends on its persistence flags.
func (s *Server) Restart() {
	s.tb.Helper()
	s.Kill()
	s.start()
}

// Client returns a go-redis client for the server, closed with the test.
func (s *Server) Client() *redis.Client {
	c := redis.NewClient(&redis.Options{Addr: s.Addr, TLSConfig: s.tls})
	s.tb.Cleanup(func() { _ = c.Close() })
	return c
}

func (s *Server) log() string {
	b, _ := os.ReadFile(s.logf)
	return string(b)
}

func ping(addr string, tlsConfig *tls.Config) error {
	var conn net.Conn
	var err error
	if tlsConfig != nil {
		conn, err = tls.DialWithDialer(&net.Dialer{Timeout: time.Second}, "tcp", addr, tlsConfig)
	} else {
		conn, err = net.DialTimeout("tcp", addr, time.Second)
	}
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	if _, err := conn.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if line != "+PONG\r\n" && !strings.HasPrefix(line, "-NOAUTH") { // a password is set: it is up

		return fmt.Errorf("PING answered %q", line)
	}
	return nil
}

func freePort(tb testing.TB) int {
	return freePorts(tb, 1)[0]
}

// freePorts returns n distinct free loopback ports, all held open until
// the last is chosen.
func freePorts(tb testing.TB, n int) []int {
	tb.Helper()
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			tb.Fatal(err)
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports
}

func portOf(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}
