package redistest

import (
	"bytes"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// delayProxy stands in front of a master on its host: clients connect to
// it and it passes their bytes through, but what the master sends on a
// replication link (a connection that has sent REPLCONF) reaches the
// replica only delay later, as over a slow network or to a replica that
// falls behind. When the master goes away the proxy goes with it: bytes
// still in flight are dropped, as when the master's host crashes, so the
// replica never gets the last writes the master acknowledged.
type delayProxy struct {
	addr   string
	target string
	delay  time.Duration
	l      net.Listener
	quit   chan struct{}
	wg     sync.WaitGroup
}

func startDelayProxy(tb testing.TB, target string, delay time.Duration) *delayProxy {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	p := &delayProxy{addr: l.Addr().String(), target: target, delay: delay, l: l, quit: make(chan struct{})}
	p.wg.Add(1)
	go p.serve()
	tb.Cleanup(func() { _ = l.Close(); close(p.quit); p.wg.Wait() })
	return p
}

func (p *delayProxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.l.Accept()
		if err != nil {
			return
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.pipe(c)
		}()
	}
}

type chunk struct {
	b  []byte
	at time.Time // when it may be delivered
}

func (p *delayProxy) pipe(client net.Conn) {
	defer client.Close()
	server, err := net.DialTimeout("tcp", p.target, time.Second)
	if err != nil {
		return
	}
	defer server.Close()
	var replication atomic.Bool
	done := make(chan struct{})
	var once sync.Once
	stop := func() { once.Do(func() { close(done); _ = client.Close(); _ = server.Close() }) }
	go func() {
		select {
		case <-p.quit:
			stop()
		case <-done:
		}
	}()

	// client → server at once; note a replication handshake.
	go func() {
		defer stop()
		buf := make([]byte, 32<<10)
		for {
			n, err := client.Read(buf)
			if n > 0 {
				if bytes.Contains(bytes.ToUpper(buf[:n]), []byte("REPLCONF")) {
					replication.Store(true)
				}
				if _, werr := server.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()

	// server → client, delayed on a replication link; whatever is queued
	// when the server goes away is dropped.
	queue := make(chan chunk, 1<<16)
	go func() {
		defer stop()
		for {
			buf := make([]byte, 32<<10)
			n, err := server.Read(buf)
			if n > 0 {
				at := time.Now()
				if replication.Load() {
					at = at.Add(p.delay)
				}
				select {
				case queue <- chunk{buf[:n], at}:
				case <-done:
					return
				}
			}
			if err != nil {
				return // io.EOF or a reset: the master is gone
			}
		}
	}()
	for {
		select {
		case <-done:
			return
		case c := <-queue:
			if d := time.Until(c.at); d > 0 {
				select {
				case <-done:
					return
				case <-time.After(d):
				}
			}
			if _, err := client.Write(c.b); err != nil {
				stop()
				return
			}
		}
	}
}
