// Package e2e runs the real programs together: a sandbox, a private
// redis-server, worker processes and the enqueuer, as an operator would.
package e2e

import (
	"bytes"
	"context"
	"encoding/csv"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/redistest"
	"github.com/couponflow/dispatcher/internal/sandbox"
)

var binDir string

// TestMain builds the programs once; every test runs them as processes.
func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(func() int {
		if testing.Short() {
			fmt.Println("e2e: skipped in -short mode")
			return 0
		}
		dir, err := os.MkdirTemp("", "e2e-bin-")
		if err != nil {
			panic(err)
		}
		defer os.RemoveAll(dir)
		cmd := exec.Command("go", "build", "-o", dir+"/", "../cmd/worker", "../cmd/enqueuer", "../cmd/wxsandbox", "../cmd/receiver")
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Println("e2e: building the programs:", err)
			return 1
		}
		binDir = dir
		return m.Run()
	}())
}

// rig is one test's system: a sandbox in this process (so the test can
// read its ledger and change its faults), a private Redis, and programs.
type rig struct {
	t     *testing.T
	sb    *sandbox.Server
	redis *redistest.Server // nil when the rig runs on Sentinel or Cluster
	rdb   redis.UniversalClient
	store *idempotency.Store
	env   []string
	dir   string
}

func newRig(t *testing.T, redisArgs ...string) *rig {
	t.Helper()
	srv := redistest.Start(t, redisArgs...)
	r := newRigOn(t, "REDIS_ADDR", srv.Addr, srv.Client())
	r.redis = srv
	return r
}

// newRigOn runs the programs against the Redis that variable=value names,
// with rdb the test's own client to it.
func newRigOn(t *testing.T, variable, value string, rdb redis.UniversalClient) *rig {
	t.Helper()
	dir := t.TempDir()
	sb, err := sandbox.New(sandbox.Config{DataDir: filepath.Join(dir, "sandbox")})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go sb.Serve(l)
	<-sb.Ready()
	t.Cleanup(func() { sb.Close() })
	r := &rig{t: t, sb: sb, rdb: rdb, store: idempotency.New(rdb), dir: dir}
	r.env = append(os.Environ(), variable+"="+value, "LOG_FORMAT=json", "LOG_LEVEL=info",
		// Several workers run on this one host: each takes a free port.
		"WORKER_HTTP_ADDR=127.0.0.1:0")
	for k, v := range sb.Env() {
		r.env = append(r.env, k+"="+v)
	}
	return r
}

func (r *rig) stockID() string { return r.sb.Env()["SANDBOX_STOCK_ID"] }

// proc is a program running in the background.
type proc struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
	err  error
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// worker starts a worker process; it is stopped when the test ends.
func (r *rig) worker(name string, args ...string) *proc {
	r.t.Helper()
	p := r.start(filepath.Join(binDir, "worker"), args...)
	r.t.Cleanup(func() {
		p.signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(30 * time.Second):
			p.signal(syscall.SIGKILL)
			<-p.done
		}
		if r.t.Failed() {
			r.t.Logf("worker %s log (tail):\n%s", name, tail(p.out.String(), 40))
		}
	})
	return p
}

func (r *rig) start(bin string, args ...string) *proc {
	r.t.Helper()
	p := &proc{cmd: exec.Command(bin, args...), out: &syncBuffer{}, done: make(chan struct{})}
	p.cmd.Env = r.env
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		r.t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	return p
}

func (p *proc) signal(sig syscall.Signal) { _ = p.cmd.Process.Signal(sig) }

// enqueuer runs the enqueuer to its end and returns its output and exit code.
func (r *rig) enqueuer(args ...string) (string, int) {
	r.t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "enqueuer"), args...)
	cmd.Env = r.env
	out, err := cmd.CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		r.t.Fatal(err)
	}
	return string(out), code
}

// writeUsers writes a CSV of n recipients and returns its path and openids.
func (r *rig) writeUsers(name string, n int) (string, []string) {
	r.t.Helper()
	var b strings.Builder
	b.WriteString("openid\n")
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("o%s_%06d", name, i)
		b.WriteString(ids[i] + "\n")
	}
	path := filepath.Join(r.dir, name+".csv")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		r.t.Fatal(err)
	}
	return path, ids
}

// waitFor polls the campaign's status until cond holds or timeout passes.
func (r *rig) waitFor(campaign string, timeout time.Duration, what string, cond func(idempotency.Status) bool) idempotency.Status {
	r.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st, err := r.store.Status(context.Background(), campaign)
		if err != nil {
			r.t.Fatal(err)
		}
		if cond(st) {
			return st
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("campaign %s: %s did not happen within %s; status %+v", campaign, what, timeout, st)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// checkOneCouponEach asserts that the ledger holds exactly one coupon per
// recipient of stock, and nothing for anyone else.
func (r *rig) checkOneCouponEach(stock string, openids []string) map[string]sandbox.LedgerCoupon {
	r.t.Helper()
	byOpenID := map[string]sandbox.LedgerCoupon{}
	for _, c := range r.sb.Ledger().Coupons {
		if c.StockID != stock {
			continue
		}
		if prev, dup := byOpenID[c.OpenID]; dup {
			r.t.Fatalf("%s got two coupons: %s and %s", c.OpenID, prev.CouponID, c.CouponID)
		}
		byOpenID[c.OpenID] = c
	}
	for _, id := range openids {
		if _, ok := byOpenID[id]; !ok {
			r.t.Fatalf("%s got no coupon (%d of %d did)", id, len(byOpenID), len(openids))
		}
	}
	if len(byOpenID) != len(openids) {
		r.t.Fatalf("%d users got coupons, %d were in the campaign", len(byOpenID), len(openids))
	}
	return byOpenID
}

// report runs enqueuer report and parses it.
func (r *rig) report(campaign string) [][]string {
	r.t.Helper()
	path := filepath.Join(r.dir, campaign+"-report.csv")
	out, code := r.enqueuer("report", "--campaign", campaign, "--out", path)
	if code != 0 {
		r.t.Fatalf("report exited %d: %s", code, out)
	}
	f, err := os.Open(path)
	if err != nil {
		r.t.Fatal(err)
	}
	defer f.Close()
	rows, err := csv.NewReader(f).ReadAll()
	if err != nil {
		r.t.Fatal(err)
	}
	return rows
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
