package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/redistest"
	"github.com/couponflow/dispatcher/internal/tasks"
)

const (
	user     = "operator"
	password = "pa55-Word-never-logged"
	mchID    = "1900000109"
)

// env clears every variable the monitor reads, then sets kv.
func env(t *testing.T, kv ...string) {
	t.Helper()
	for _, v := range []string{"MONITOR_ADDR", "MONITOR_USER", "MONITOR_PASSWORD", "MONITOR_TOKEN", "MONITOR_READONLY", "MONITOR_ASYNQMON_WRITES",
		"QUEUE", "MONITOR_REFRESH", "REDIS_ADDR", "REDIS_URL", "WECHATPAY_MCHID", "WORKER_RATE_LIMITS",
		"LOG_FORMAT", "LOG_LEVEL"} {
		t.Setenv(v, "")
	}
	for i := 0; i+1 < len(kv); i += 2 {
		t.Setenv(kv[i], kv[i+1])
	}
}

func TestRefusesPublicAddressWithoutCredentials(t *testing.T) {
	// Redis is unreachable: the refusal comes before any connection.
	env(t, "REDIS_ADDR", "127.0.0.1:1")
	for _, args := range [][]string{{"--addr", "0.0.0.0:8080"}, {"--addr", ":8080"}} {
		var log bytes.Buffer
		err := run(context.Background(), args, &log, nil)
		if err == nil {
			t.Fatalf("%v without credentials started", args)
		}
		for _, v := range []string{"MONITOR_USER", "MONITOR_PASSWORD", "MONITOR_TOKEN"} {
			if !strings.Contains(err.Error(), v) {
				t.Errorf("%v: the refusal does not name %s: %v", args, v, err)
			}
		}
		if strings.Contains(err.Error(), "monitor:") {
			t.Errorf("main prints the program's name before the error, which names it again: %v", err)
		}
	}
	t.Setenv("MONITOR_ADDR", "0.0.0.0:8080")
	if err := run(context.Background(), nil, io.Discard, nil); err == nil || !strings.Contains(err.Error(), "MONITOR_TOKEN") {
		t.Errorf("MONITOR_ADDR=0.0.0.0:8080 without credentials: %v", err)
	}
}

func TestRefusesHalfBasicAuth(t *testing.T) {
	env(t, "REDIS_ADDR", "127.0.0.1:1", "MONITOR_USER", user)
	err := run(context.Background(), []string{"--addr", "0.0.0.0:8080"}, io.Discard, nil)
	if err == nil || !strings.Contains(err.Error(), "MONITOR_PASSWORD") {
		t.Errorf("MONITOR_USER without MONITOR_PASSWORD: %v", err)
	}
	env(t, "REDIS_ADDR", "127.0.0.1:1", "MONITOR_PASSWORD", password)
	err = run(context.Background(), []string{"--addr", "127.0.0.1:0"}, io.Discard, nil)
	if err == nil || !strings.Contains(err.Error(), "MONITOR_USER") || strings.Contains(err.Error(), password) {
		t.Errorf("MONITOR_PASSWORD without MONITOR_USER: %v", err)
	}
}

// syncBuffer is a log written by one goroutine and read by another.
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

func get(t *testing.T, url string, auth bool) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	if auth {
		req.SetBasicAuth(user, password)
	}
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// seed gives Redis a campaign of two sends, one succeeded, and a queued task.
func seed(t *testing.T, srv *redistest.Server) {
	t.Helper()
	ctx := context.Background()
	rdb := srv.Client()
	store := idempotency.New(rdb)
	if _, err := store.SaveCampaign(ctx, idempotency.Campaign{Name: "c1", MchID: mchID, Deadline: time.Now().Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	for _, orn := range []string{"r1", "r2"} {
		if _, _, err := store.Register(ctx, idempotency.Send{MchID: mchID, OutRequestNo: orn, Campaign: "c1", OpenID: "o" + orn, StockID: "1"}); err != nil {
			t.Fatal(err)
		}
	}
	send := idempotency.Send{MchID: mchID, OutRequestNo: "r1", Campaign: "c1", OpenID: "or1", StockID: "1"}
	if c, err := store.TryClaim(ctx, send, "w", time.Minute); err != nil || !c.Acquired {
		t.Fatal(c, err)
	}
	if err := store.Finish(ctx, send, "w", idempotency.Result{State: idempotency.Succeeded, CouponID: "C1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := asynq.NewClientFromRedisClient(rdb).Enqueue(asynq.NewTask(tasks.TypeSendCoupon, nil), asynq.Queue(tasks.DefaultQueue)); err != nil {
		t.Fatal(err)
	}
}

func TestServesThenStops(t *testing.T) {
	srv := redistest.Start(t)
	seed(t, srv)
	env(t, "REDIS_ADDR", srv.Addr, "MONITOR_USER", user, "MONITOR_PASSWORD", password, "WECHATPAY_MCHID", mchID)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var log syncBuffer
	addrc := make(chan net.Addr, 1)
	done := make(chan error, 1)
	go func() { done <- run(ctx, []string{"--addr", "127.0.0.1:0"}, &log, func(a net.Addr) { addrc <- a }) }()
	var base string
	select {
	case a := <-addrc:
		base = "http://" + a.String()
	case err := <-done:
		t.Fatalf("monitor stopped at start: %v\n%s", err, log.String())
	case <-time.After(20 * time.Second):
		t.Fatalf("monitor did not start:\n%s", log.String())
	}

	if code, _ := get(t, base+"/healthz", false); code != http.StatusOK {
		t.Errorf("/healthz: %d", code)
	}
	if code, _ := get(t, base+"/readyz", false); code != http.StatusOK {
		t.Errorf("/readyz: %d", code)
	}
	for _, path := range []string{"/", "/api/campaigns", "/monitoring/", "/metrics"} {
		if code, _ := get(t, base+path, false); code != http.StatusUnauthorized {
			t.Errorf("%s without credentials: %d, want 401", path, code)
		}
		if code, _ := get(t, base+path, true); code != http.StatusOK {
			t.Errorf("%s with credentials: %d, want 200", path, code)
		}
	}
	code, body := get(t, base+"/api/campaigns/c1", true)
	var c struct {
		Total, Succeeded int64
		Merchant         struct{ MchID string }
	}
	if err := json.Unmarshal([]byte(body), &c); err != nil || code != http.StatusOK || c.Total != 2 || c.Succeeded != 1 || c.Merchant.MchID != mchID {
		t.Errorf("/api/campaigns/c1: %d %+v %v\n%s", code, c, err, body)
	}
	// /metrics: asynq's queues and internal/metrics' fleet collector.
	_, body = get(t, base+"/metrics", true)
	for _, want := range []string{
		`asynq_tasks_enqueued_total{queue="coupons",state="pending"} 1`,
		`couponflow_campaign_total{campaign="c1"} 2`,
		`couponflow_campaign_sends{campaign="c1",state="succeeded"} 1`,
		`couponflow_ratelimit_rate{endpoint="favor_send"} 500`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("run after cancel: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("monitor did not stop after its context ended")
	}
	out := log.String()
	for _, want := range []string{`"msg":"monitor listening"`, `"auth":"basic"`, `"msg":"monitor stopped"`} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %s:\n%s", want, out)
		}
	}
	if strings.Contains(out, password) {
		t.Errorf("the log shows the password:\n%s", out)
	}
}

// TestSIGTERMStopsGracefully runs the built program and stops it as an
// orchestrator would.
func TestSIGTERMStopsGracefully(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "monitor")
	build := exec.Command("go", "build", "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	srv := redistest.Start(t)
	cmd := exec.Command(bin, "--addr", "127.0.0.1:0")
	cmd.Env = append(os.Environ(), "REDIS_ADDR="+srv.Addr, "MONITOR_TOKEN=tok-"+password, "MONITOR_USER=", "MONITOR_PASSWORD=", "REDIS_URL=", "MONITOR_ADDR=")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill() }()
	lines := make(chan string, 100)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	var log []string
	var base string
	for base == "" {
		select {
		case line, ok := <-lines:
			if !ok {
				t.Fatalf("monitor exited at start:\n%s", strings.Join(log, "\n"))
			}
			log = append(log, line)
			var rec struct{ Msg, URL string }
			if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "monitor listening" {
				base = strings.TrimSuffix(rec.URL, "/")
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("monitor did not start:\n%s", strings.Join(log, "\n"))
		}
	}
	req, _ := http.NewRequest(http.MethodGet, base+"/api/campaigns", nil)
	req.Header.Set("Authorization", "Bearer tok-"+password)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("bearer token: %d", resp.StatusCode)
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	deadline := time.After(15 * time.Second)
	for open := true; open; {
		select {
		case line, ok := <-lines:
			if open = ok; ok {
				log = append(log, line)
			}
		case <-deadline:
			t.Fatalf("monitor did not exit after SIGTERM:\n%s", strings.Join(log, "\n"))
		}
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("exit after SIGTERM: %v\n%s", err, strings.Join(log, "\n"))
	}
	all := strings.Join(log, "\n")
	if !strings.Contains(all, `"msg":"monitor stopped"`) || strings.Contains(all, password) {
		t.Errorf("log after SIGTERM:\n%s", all)
	}
}
