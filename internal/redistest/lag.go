package redistest

import (
	"sync"
	"syscall"
	"time"
)

// Pause stops the server's process (SIGSTOP) without closing its
// connections: clients and its master see a server that does not answer,
// as a stalled one (a long fork, a swapping host) does. Resume continues it.
func (s *Server) Pause() { s.signal(syscall.SIGSTOP) }

// Resume continues a paused server (SIGCONT).
func (s *Server) Resume() { s.signal(syscall.SIGCONT) }

func (s *Server) signal(sig syscall.Signal) {
	s.tb.Helper()
	if s.cmd == nil || s.cmd.Process == nil {
		s.tb.Fatalf("redistest: the server on %s is not running", s.Addr)
	}
	if err := s.cmd.Process.Signal(sig); err != nil {
		s.tb.Fatalf("redistest: signalling the server on %s: %v", s.Addr, err)
	}
}

// Lag makes the server fall behind, as a busy replica does: it pauses the
// process for paused, lets it run for running, and again, until the
// returned func is called, which leaves it running. A replica so treated
// applies its master's writes up to about paused late; keep paused well
// under a Sentinel's down-after-milliseconds (1s) so none declares it down.
func (s *Server) Lag(paused, running time.Duration) (stop func()) {
	s.tb.Helper()
	pid := s.cmd.Process.Pid
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			_ = syscall.Kill(pid, syscall.SIGSTOP)
			select {
			case <-done:
				_ = syscall.Kill(pid, syscall.SIGCONT)
				return
			case <-time.After(paused):
			}
			_ = syscall.Kill(pid, syscall.SIGCONT)
			select {
			case <-done:
				return
			case <-time.After(running):
			}
		}
	}()
	var once sync.Once
	stop = func() { once.Do(func() { close(done); wg.Wait() }) }
	s.tb.Cleanup(stop)
	return stop
}
