package monitor_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/monitor"
	"github.com/couponflow/dispatcher/internal/redisconn"
	"github.com/couponflow/dispatcher/internal/redistest"
)

// protected are the paths behind authentication.
var protected = []string{"/", "/campaigns/spring", "/monitoring/", "/monitoring/api/queues", "/api/campaigns",
	"/api/campaigns/spring", "/api/campaigns/spring/report.csv", "/metrics"}

func TestBasicAuth(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword))
	r.campaign("spring", 2)
	for _, path := range protected {
		resp, body := r.get(path, noAuth)
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("GET %s without credentials: %d, want 401", path, resp.StatusCode)
		}
		if got := resp.Header.Get("WWW-Authenticate"); !strings.HasPrefix(got, `Basic realm=`) {
			t.Errorf("GET %s without credentials: WWW-Authenticate %q, want a basic challenge", path, got)
		}
		if strings.Contains(body, "spring") {
			t.Errorf("GET %s without credentials shows the campaign:\n%s", path, body)
		}
		for _, wrong := range []auth{basic(testUser, "wrong"), basic("someone", testPassword),
			basic(testUser, testPassword+"x"), basic(testUser, ""), bearer(testPassword)} {
			if resp, _ := r.get(path, wrong); resp.StatusCode != http.StatusUnauthorized {
				t.Errorf("GET %s with wrong credentials: %d, want 401", path, resp.StatusCode)
			}
		}
		if resp, body := r.get(path, basic(testUser, testPassword)); resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s with credentials: %d, want 200:\n%s", path, resp.StatusCode, tail(body, 500))
		}
	}
	// An unknown path is not told apart from a known one before login.
	if resp, _ := r.get("/no/such/page", noAuth); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("unknown path without credentials: %d, want 401", resp.StatusCode)
	}
	if resp, _ := r.get("/no/such/page", basic(testUser, testPassword)); resp.StatusCode != http.StatusNotFound {
		t.Errorf("unknown path with credentials: %d, want 404", resp.StatusCode)
	}
	for _, path := range []string{"/healthz", "/readyz"} {
		if resp, body := r.get(path, noAuth); resp.StatusCode != http.StatusOK || body != "ok\n" {
			t.Errorf("GET %s without credentials: %d %q, want 200 ok", path, resp.StatusCode, body)
		}
	}
	if got := r.mon.AuthMode(); got != "basic" {
		t.Errorf("AuthMode %q, want basic", got)
	}
}

func TestTokenAuth(t *testing.T) {
	r := newRig(t, monitor.WithToken(testToken))
	r.campaign("spring", 2)
	for _, path := range protected {
		resp, _ := r.get(path, noAuth)
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("GET %s without a token: %d, want 401", path, resp.StatusCode)
		}
		challenges := strings.Join(resp.Header.Values("WWW-Authenticate"), "; ")
		if !strings.Contains(challenges, "Bearer realm=") || !strings.Contains(challenges, "Basic realm=") {
			t.Errorf("GET %s without a token: challenges %q, want Bearer and Basic", path, challenges)
		}
		for _, wrong := range []auth{bearer("tok-wrong"), bearer(testToken + "0"), bearer(""), basic(testToken, "x")} {
			if resp, _ := r.get(path, wrong); resp.StatusCode != http.StatusUnauthorized {
				t.Errorf("GET %s with a wrong token: %d, want 401", path, resp.StatusCode)
			}
		}
		if resp, _ := r.get(path, bearer(testToken)); resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s with the token: %d, want 200", path, resp.StatusCode)
		}
		// A browser gives the token as the basic-auth password.
		if resp, _ := r.get(path, basic("anyone", testToken)); resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s with the token as basic password: %d, want 200", path, resp.StatusCode)
		}
	}
	if resp, _ := r.get("/healthz", noAuth); resp.StatusCode != http.StatusOK {
		t.Errorf("/healthz without a token: %d", resp.StatusCode)
	}
}

func TestBasicAndTokenTogether(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithToken(testToken))
	for _, a := range []auth{basic(testUser, testPassword), bearer(testToken)} {
		if resp, _ := r.get("/api/campaigns", a); resp.StatusCode != http.StatusOK {
			t.Errorf("with one of both credentials: %d, want 200", resp.StatusCode)
		}
	}
	if resp, _ := r.get("/api/campaigns", basic(testUser, "wrong")); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("wrong password: %d, want 401", resp.StatusCode)
	}
}

func TestHalfBasicAuthIsRefused(t *testing.T) {
	srv := redistest.Start(t)
	spec, _ := redisconn.ParseURL(srv.Addr)
	for _, c := range []struct{ user, password, want string }{
		{testUser, "", "MONITOR_PASSWORD"},
		{"", testPassword, "MONITOR_USER"},
	} {
		_, err := monitor.New(srv.Client(), spec.AsynqConnOpt(), monitor.WithBasicAuth(c.user, c.password))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("user %q password set %v: error %v, want one naming %s", c.user, c.password != "", err, c.want)
		}
		if err != nil && c.password != "" && strings.Contains(err.Error(), c.password) {
			t.Errorf("error shows the password: %v", err)
		}
	}
}

func TestCheckExposure(t *testing.T) {
	for _, c := range []struct {
		addr string
		ok   bool
	}{
		{"127.0.0.1:8080", true}, {"127.3.4.5:80", true}, {"[::1]:8080", true}, {"localhost:8080", true},
		{"LOCALHOST:1", true}, {"[::ffff:127.0.0.1]:80", true},
		{"0.0.0.0:8080", false}, {":8080", false}, {"[::]:8080", false}, {"10.1.2.3:8080", false},
		{"192.168.0.10:80", false}, {"monitor.example.com:80", false}, {"128.0.0.1:80", false},
	} {
		err := monitor.CheckExposure(c.addr, false)
		if (err == nil) != c.ok {
			t.Errorf("CheckExposure(%q) without credentials: %v, want ok=%v", c.addr, err, c.ok)
		}
		if err := monitor.CheckExposure(c.addr, true); err != nil {
			t.Errorf("CheckExposure(%q) with credentials: %v", c.addr, err)
		}
	}
}

func TestNoCredentialsOnlyOnLoopback(t *testing.T) {
	r := newRig(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// On every interface it refuses to start, naming the variables.
	done := make(chan error, 1)
	go func() { done <- r.mon.ListenAndServe(ctx, "0.0.0.0:0") }()
	select {
	case err := <-done:
		if !errors.Is(err, monitor.ErrNoCredentials) {
			t.Errorf("ListenAndServe on 0.0.0.0 without credentials: %v, want ErrNoCredentials", err)
		}
		for _, v := range []string{"MONITOR_USER", "MONITOR_PASSWORD", "MONITOR_TOKEN"} {
			if err == nil || !strings.Contains(err.Error(), v) {
				t.Errorf("the refusal does not name %s: %v", v, err)
			}
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ListenAndServe on 0.0.0.0 without credentials started serving")
	}

	// On loopback it starts, and serves without credentials.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { done <- r.mon.Serve(ctx, l) }()
	resp, err := http.Get("http://" + l.Addr().String() + "/api/campaigns")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `"campaigns"`) {
		t.Errorf("on loopback without credentials: %d %s", resp.StatusCode, body)
	}
	if got := r.mon.AuthMode(); got != "none" {
		t.Errorf("AuthMode %q, want none", got)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve after cancel: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("Serve did not return after its context ended")
	}
}

func TestReadyzFollowsRedis(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword))
	if resp, _ := r.get("/readyz", noAuth); resp.StatusCode != http.StatusOK {
		t.Fatalf("/readyz with Redis up: %d", resp.StatusCode)
	}
	r.redis.Kill()
	start := time.Now()
	resp, body := r.get("/readyz", noAuth)
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.HasPrefix(body, "redis: ") {
		t.Errorf("/readyz with Redis down: %d %q, want 503 naming redis", resp.StatusCode, body)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("/readyz took %s with Redis down, want about 1s at most", d)
	}
	if resp, _ := r.get("/healthz", noAuth); resp.StatusCode != http.StatusOK {
		t.Errorf("/healthz with Redis down: %d, want 200", resp.StatusCode)
	}
	r.redis.Restart()
	if resp, _ := r.get("/readyz", noAuth); resp.StatusCode != http.StatusOK {
		t.Errorf("/readyz after Redis came back: %d", resp.StatusCode)
	}
}

// Without credentials the monitor listens on loopback only, but a page of
// another site can point its own name at 127.0.0.1 (DNS rebinding): only a
// loopback host name is answered.
func TestWithoutCredentialsOnlyLoopbackHostNames(t *testing.T) {
	r := newRig(t)
	r.campaign("spring", 1)
	for _, host := range []string{"localhost", "localhost:8080", "127.0.0.1:8080", "[::1]:8080", "LOCALHOST."} {
		if resp, _ := r.do("GET", "/api/campaigns/spring/report.csv", noAuth, "Host", host); resp.StatusCode != 200 {
			t.Errorf("Host %s: %d", host, resp.StatusCode)
		}
	}
	for _, host := range []string{"evil.example", "evil.example:8080", "127.0.0.1.evil.example", "10.0.0.1:8080"} {
		for _, path := range []string{"/api/campaigns/spring/report.csv", "/monitoring/api/queues", "/"} {
			if resp, body := r.do("GET", path, noAuth, "Host", host); resp.StatusCode != http.StatusMisdirectedRequest || strings.Contains(body, "out_request_no") {
				t.Errorf("Host %s, %s: %d", host, path, resp.StatusCode)
			}
		}
	}
	// Health stays reachable for probes that use any name.
	if resp, _ := r.do("GET", "/healthz", noAuth, "Host", "evil.example"); resp.StatusCode != 200 {
		t.Errorf("/healthz: %d", resp.StatusCode)
	}
	// With credentials the name does not matter: the credentials do.
	a := newRig(t, monitor.WithBasicAuth(testUser, testPassword))
	if resp, _ := a.do("GET", "/api/campaigns", operator, "Host", "monitor.internal.example"); resp.StatusCode != 200 {
		t.Errorf("with credentials: %d", resp.StatusCode)
	}
}

// asynqmon's pages carry the headers ours do: its buttons cannot be
// framed by another site.
func TestAsynqmonPagesCannotBeFramed(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword))
	for _, path := range []string{"/monitoring/", "/monitoring/api/queues"} {
		resp, _ := r.get(path, operator)
		h := resp.Header
		if h.Get("X-Frame-Options") != "DENY" || !strings.Contains(h.Get("Content-Security-Policy"), "frame-ancestors 'none'") ||
			h.Get("X-Content-Type-Options") != "nosniff" || h.Get("Cache-Control") != "no-store" {
			t.Errorf("%s: %d, headers %v", path, resp.StatusCode, h)
		}
	}
}

// The two pages an on-call engineer may meet first: no campaign yet (what
// to run), and Redis down (what it means, what to check; no "no
// campaign" beside it), which mends itself once Redis is back.
func TestPagesWithoutCampaignAndWithRedisDown(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword))
	resp, body := r.get("/", operator)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("empty index: %d", resp.StatusCode)
	}
	mustContain(t, "empty index", body, `id="no-campaign"`, "enqueuer campaign --campaign spring --file users.csv", "make demo",
		`data-active="true"`) // it refreshes until a campaign appears
	if strings.Contains(body, `id="error"`) {
		t.Errorf("empty index shows an error:\n%s", body)
	}

	r.redis.Kill()
	for _, path := range []string{"/", "/campaigns/spring"} {
		resp, body = r.get(path, operator)
		if resp.StatusCode != http.StatusServiceUnavailable {
			t.Errorf("%s with Redis down: %d, want 503", path, resp.StatusCode)
		}
		mustContain(t, path+" with Redis down", body, `id="error"`, "Redis does not answer", "REDIS_ADDR", "tries again every")
		if strings.Contains(body, `id="no-campaign"`) {
			t.Errorf("%s with Redis down says there is no campaign", path)
		}
	}
	resp, body = r.get("/api/campaigns", operator)
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(body, `"error"`) {
		t.Errorf("API with Redis down: %d %s", resp.StatusCode, body)
	}

	r.redis.Restart()
	if resp, body = r.get("/", operator); resp.StatusCode != http.StatusOK || strings.Contains(body, `id="error"`) {
		t.Errorf("index once Redis is back: %d\n%s", resp.StatusCode, tail(body, 400))
	}
}
