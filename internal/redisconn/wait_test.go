package redisconn

import (
	"bufio"
	"context"
	"errors"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/redistest"
)

// Redis down at first, then started: WaitReady says it waits, then
// returns once Redis answers.
func TestWaitReadyDownThenUp(t *testing.T) {
	t.Parallel()
	srv := redistest.Start(t)
	srv.Kill()
	spec, err := ParseURL("redis://" + srv.Addr)
	if err != nil {
		t.Fatal(err)
	}
	c, err := Connect(spec, 10)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var mu sync.Mutex
	var waits []string
	ready := make(chan time.Duration, 1)
	done := make(chan error, 1)
	go func() {
		done <- WaitReady(context.Background(), c, spec, WaitOptions{
			Poll: 50 * time.Millisecond, Every: 300 * time.Millisecond,
			Waiting: func(err error, _ time.Duration) {
				mu.Lock()
				waits = append(waits, err.Error())
				mu.Unlock()
			},
			Ready: func(waited time.Duration) { ready <- waited },
		})
	}()
	// Down for a while: told at once, then every 300ms.
	deadline := time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		n := len(waits)
		mu.Unlock()
		if n >= 2 {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("WaitReady returned %v with Redis down", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("told %d times in 10s", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	srv.Restart()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("WaitReady did not return once Redis answered")
	}
	select {
	case w := <-ready:
		if w < 600*time.Millisecond {
			t.Errorf("Ready after %s, want at least 600ms", w)
		}
	default:
		t.Error("Ready was not called")
	}
	mu.Lock()
	defer mu.Unlock()
	if !strings.Contains(waits[0], "does not answer") || !strings.Contains(waits[0], srv.Addr) {
		t.Errorf("the first wait says %q", waits[0])
	}
}

// A server loading its data set answers LOADING to everything: not ready.
func TestWaitReadyLoading(t *testing.T) {
	t.Parallel()
	addr := fakeLoading(t)
	spec, err := ParseURL("redis://" + addr)
	if err != nil {
		t.Fatal(err)
	}
	if err := Check(context.Background(), mustConnect(t, spec), spec); err == nil || !strings.Contains(err.Error(), "LOADING") {
		t.Fatalf("Check of a loading server: %v, want a LOADING error", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	var told []string
	err = WaitReady(ctx, mustConnect(t, spec), spec, WaitOptions{Poll: 50 * time.Millisecond,
		Waiting: func(err error, _ time.Duration) { told = append(told, err.Error()) }})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitReady on a loading server: %v, want it still waiting at the deadline", err)
	}
	if len(told) != 1 || !strings.Contains(told[0], "LOADING") {
		t.Errorf("told %q, want one line with LOADING", told)
	}
}

// A Sentinel given as a plain server: waiting cannot cure it.
func TestWaitReadyMisconfigured(t *testing.T) {
	t.Parallel()
	s := redistest.StartSentinel(t)
	spec, err := ParseURL("redis://" + s.Sentinels[0].Addr)
	if err != nil {
		t.Fatal(err)
	}
	err = WaitReady(context.Background(), mustConnect(t, spec), spec, WaitOptions{})
	if _, ok := errors.AsType[*MisconfiguredError](err); !ok || !strings.Contains(err.Error(), "is a Sentinel") {
		t.Fatalf("%v, want a *MisconfiguredError", err)
	}
}

func mustConnect(t *testing.T, spec Spec) redis.UniversalClient {
	t.Helper()
	c, err := Connect(spec, 10)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// fakeLoading serves a Redis that answers every command with LOADING, as
// one reading a large AOF does.
func fakeLoading(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				rd := bufio.NewReader(conn)
				for {
					line, err := rd.ReadString('\n')
					if err != nil {
						return
					}
					n, _ := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(line, "*")))
					for range n {
						hdr, err := rd.ReadString('\n')
						if err != nil {
							return
						}
						size, _ := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(hdr, "$")))
						if _, err := rd.Discard(size + 2); err != nil {
							return
						}
					}
					if _, err := conn.Write([]byte("-LOADING Redis is loading the dataset in memory\r\n")); err != nil {
						return
					}
				}
			}()
		}
	}()
	return l.Addr().String()
}
