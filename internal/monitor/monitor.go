// Package monitor is the operator's web view of couponflow: a page of every
// campaign with its progress, send rate, states and failures, its control
// and audit trail, with pause, resume and cancel behind a confirmation
// (actions.go; none in read-only mode), the merchant's shared rate and
// open budget breakers; a JSON API and the
// campaign report as CSV behind it; asynqmon (the asynq web console) under
// /monitoring/; Prometheus metrics under /metrics; and /healthz and /readyz
// for orchestrators.
//
// Everything but /healthz and /readyz sits behind one authentication:
// HTTP basic auth (WithBasicAuth), a bearer token (WithToken), or both.
// Without credentials the server only listens on a loopback address
// (CheckExposure). Credentials are compared in constant time and never
// logged.
//
// New builds the server over a Redis client (our keys, asynq's inspector
// for the queue metrics) and an asynq.RedisConnOpt for asynqmon, which
// opens connections of its own; ConnOpt makes that option from the same
// redisconn.Spec. Handler serves it in-process (tests use httptest);
// ListenAndServe and Serve run it until their context ends, then shut down
// gracefully.
package monitor

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/hibiken/asynq"
	"github.com/hibiken/asynq/x/metrics"
	"github.com/hibiken/asynqmon"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/campaignctl"
	"github.com/couponflow/dispatcher/internal/idempotency"
	cfmetrics "github.com/couponflow/dispatcher/internal/metrics"
	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// The environment variables that configure authentication, as cmd/monitor
// reads them; errors name them.
const (
	EnvUser     = "MONITOR_USER"
	EnvPassword = "MONITOR_PASSWORD"
	EnvToken    = "MONITOR_TOKEN"
)

// RootPath is where asynqmon is mounted.
const RootPath = "/monitoring"

const (
	realm = "couponflow monitor"
	// shutdownTimeout bounds a graceful shutdown: requests in flight (a
	// report being downloaded) get this long to finish.
	shutdownTimeout = 10 * time.Second
)

// Server is the monitor. It is safe for concurrent use.
type Server struct {
	rdb       redis.UniversalClient
	store     *idempotency.Store
	limiter   *ratelimit.Limiter
	breakers  *breaker.Breakers
	inspector *asynq.Inspector
	mon       *asynqmon.HTTPHandler
	registry  *prometheus.Registry
	handler   http.Handler
	log       *slog.Logger

	user, password, token string
	userSum, passSum      [32]byte
	tokenSum              [32]byte

	mchID       string
	readOnly    bool
	monWrites   bool
	queue       string
	queueShards int
	// ctl pauses, resumes and cancels campaigns (actions.go); tokenKey
	// signs the forms that ask for it.
	ctl        *campaignctl.Controller
	tokenKey   [32]byte
	refresh    time.Duration
	collectors []prometheus.Collector
	// scans caches each campaign's records scan (judge.go), orphaned its
	// orphan checks (orphans.go).
	scans    scanCache
	orphaned orphanCache
}

// Option configures a Server.
type Option func(*Server)

// WithBasicAuth requires HTTP basic auth with this user and password
// (MONITOR_USER, MONITOR_PASSWORD). Both must be set.
func WithBasicAuth(user, password string) Option {
	return func(s *Server) { s.user, s.password = user, password }
}

// WithToken requires "Authorization: Bearer <token>" (MONITOR_TOKEN). So
// that a browser can use it too, basic auth whose password is the token
// (any user name) is accepted as well.
func WithToken(token string) Option { return func(s *Server) { s.token = token } }

// WithMchID names the merchant whose shared rate and budget breakers the
// pages show (WECHATPAY_MCHID); the merchants of the campaigns are shown
// as well.
func WithMchID(mchID string) Option { return func(s *Server) { s.mchID = mchID } }

// WithReadOnly is the monitor's read-only mode (MONITOR_READONLY): the
// campaign pages offer no pause, resume or cancel and refuse them if
// asked, and asynqmon stays read-only whatever WithAsynqmonWrites says.
func WithReadOnly(readOnly bool) Option { return func(s *Server) { s.readOnly = readOnly } }

// WithAsynqmonWrites lets asynqmon change queues and tasks
// (MONITOR_ASYNQMON_WRITES). Without it asynqmon's API refuses every
// request that is not a GET: deleting or archiving a task there strands
// its send, whose record then waits for a task that is gone (an orphan,
// which the campaign page shows and the workers' sweeper queues again,
// but only after the campaign has stalled). Campaigns are paused,
// resumed and cancelled on our pages instead, which keep the record and
// the queue in step.
func WithAsynqmonWrites(writes bool) Option { return func(s *Server) { s.monWrites = writes } }

// WithQueue names the queue the pages link to in asynqmon (default
// tasks.DefaultQueue, "coupons"), where a resume or a cancel wakes the
// campaign's waiting tasks.
func WithQueue(queue string) Option { return func(s *Server) { s.queue = queue } }

// WithQueueShards is the workers' and the enqueuer's --queue-shards
// (QUEUE_SHARDS): a resume or a cancel wakes the campaign's tasks in every
// shard of the queue.
func WithQueueShards(n int) Option { return func(s *Server) { s.queueShards = n } }

// WithRefresh sets how often a page refreshes itself while a campaign it
// shows is not done (default 2s).
func WithRefresh(d time.Duration) Option { return func(s *Server) { s.refresh = d } }

// WithLogger sets the logger (default: slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(s *Server) { s.log = l } }

// WithStore, WithLimiter and WithBreakers replace the views of our Redis
// keys that New makes by default (a limiter with the default limits, say,
// where the workers run with others: pass one built with the same
// ratelimit.WithLimits).
func WithStore(st *idempotency.Store) Option { return func(s *Server) { s.store = st } }

// WithLimiter: see WithStore.
func WithLimiter(l *ratelimit.Limiter) Option { return func(s *Server) { s.limiter = l } }

// WithBreakers: see WithStore.
func WithBreakers(b *breaker.Breakers) Option { return func(s *Server) { s.breakers = b } }

// WithCollectors adds Prometheus collectors to /metrics, beside asynq's
// queue collector (cmd/monitor adds internal/metrics' fleet collector).
func WithCollectors(cs ...prometheus.Collector) Option {
	return func(s *Server) { s.collectors = append(s.collectors, cs...) }
}

// New returns a monitor over rdb (our keys, asynq's queues) with asynqmon
// connecting through conn (see ConnOpt). Close releases asynqmon's
// connections; rdb stays the caller's.
func New(rdb redis.UniversalClient, conn asynq.RedisConnOpt, opts ...Option) (*Server, error) {
	if rdb == nil || conn == nil {
		return nil, errors.New("a Redis client and an asynq.RedisConnOpt are required")
	}
	s := &Server{rdb: rdb, queue: tasks.DefaultQueue, refresh: 2 * time.Second}
	for _, o := range opts {
		o(s)
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	switch {
	case s.user != "" && s.password == "":
		return nil, fmt.Errorf("%s is set but %s is empty: set both for basic auth", EnvUser, EnvPassword)
	case s.user == "" && s.password != "":
		return nil, fmt.Errorf("%s is set but %s is empty: set both for basic auth", EnvPassword, EnvUser)
	}
	if s.refresh <= 0 {
		s.refresh = 2 * time.Second
	}
	s.userSum, s.passSum = sha256.Sum256([]byte(s.user)), sha256.Sum256([]byte(s.password))
	s.tokenSum = sha256.Sum256([]byte(s.token))
	if s.store == nil {
		s.store = idempotency.New(rdb)
	}
	if s.limiter == nil {
		s.limiter = ratelimit.New(rdb)
	}
	if s.breakers == nil {
		s.breakers = breaker.New(rdb)
	}
	s.inspector = asynq.NewInspectorFromRedisClient(rdb)
	s.ctl = &campaignctl.Controller{Store: s.store, Redis: rdb, Queues: tasks.ShardQueues(s.queue, s.queueShards), Note: "monitor"}
	// Per process: the forms of a monitor that restarted are refused, and
	// asked for again.
	if _, err := rand.Read(s.tokenKey[:]); err != nil {
		return nil, fmt.Errorf("making the form key: %w", err)
	}

	s.registry = prometheus.NewRegistry()
	for _, c := range append([]prometheus.Collector{metrics.NewQueueMetricsCollector(s.inspector)}, s.collectors...) {
		if err := s.registry.Register(c); err != nil {
			return nil, fmt.Errorf("registering a metrics collector: %w", err)
		}
	}

	s.mon = asynqmon.New(asynqmon.Options{RootPath: RootPath, RedisConnOpt: conn, ReadOnly: s.AsynqmonReadOnly()})
	s.handler = s.routes()
	return s, nil
}

// AsynqmonReadOnly reports whether asynqmon refuses changes: unless
// WithAsynqmonWrites asked for them, and always in read-only mode.
func (s *Server) AsynqmonReadOnly() bool { return s.readOnly || !s.monWrites }

// Authenticated reports whether the server requires credentials.
func (s *Server) Authenticated() bool { return s.user != "" || s.token != "" }

// AuthMode names the authentication for the start-up log: "basic",
// "bearer", "basic+bearer" or "none".
func (s *Server) AuthMode() string {
	switch {
	case s.user != "" && s.token != "":
		return "basic+bearer"
	case s.user != "":
		return "basic"
	case s.token != "":
		return "bearer"
	}
	return "none"
}

// Handler is the whole server as an http.Handler.
func (s *Server) Handler() http.Handler { return s.handler }

// Registry is the Prometheus registry behind /metrics.
func (s *Server) Registry() *prometheus.Registry { return s.registry }

// Close releases asynqmon's Redis connections.
func (s *Server) Close() error { return s.mon.Close() }

func (s *Server) routes() http.Handler {
	private := http.NewServeMux()
	private.HandleFunc("GET /{$}", s.indexPage)
	private.HandleFunc("GET /campaigns/{name}", s.campaignPage)
	private.HandleFunc("GET /campaigns/{name}/{action}", s.confirmPage)
	private.HandleFunc("POST /campaigns/{name}/{action}", s.act)
	private.HandleFunc("GET /api/campaigns", s.apiCampaigns)
	private.HandleFunc("GET /api/campaigns/{name}", s.apiCampaign)
	private.HandleFunc("GET /api/campaigns/{name}/report.csv", s.apiReport)
	private.Handle("GET /metrics", promhttp.HandlerFor(s.registry, promhttp.HandlerOpts{
		ErrorHandling: promhttp.ContinueOnError,
		Timeout:       10 * time.Second,
	}))
	private.Handle(RootPath+"/", guardHeaders(s.mon))

	mux := http.NewServeMux()
	healthz, readyz := cfmetrics.Health(s.rdb)
	mux.Handle("GET /healthz", healthz)
	mux.Handle("GET /readyz", readyz)
	mux.Handle("/", s.authenticate(private))
	// Basic auth that a browser remembers would let another site make it
	// pause a queue or delete tasks (asynqmon's POST and DELETE calls), or
	// pause or cancel a campaign: cross-origin requests that are not GET,
	// HEAD or OPTIONS are refused (by Sec-Fetch-Site, or Origin against
	// Host). The campaign actions carry a signed token as well (actions.go).
	return http.NewCrossOriginProtection().Handler(mux)
}

// guardHeaders gives asynqmon's pages what ours carry: its delete and run
// buttons must not be framed by another site, its answers not cached or
// sniffed.
func guardHeaders(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("X-Frame-Options", "DENY")
		h.Set("Content-Security-Policy", "frame-ancestors 'none'")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Cache-Control", "no-store")
		next.ServeHTTP(w, r)
	})
}

// authenticate lets a request through with valid credentials, or when the
// server has none (then it listens only on loopback). Without credentials
// only a loopback host name is accepted: a page of another site whose name
// it points at 127.0.0.1 (DNS rebinding) would otherwise read the reports
// and change the queues through the visitor's browser.
func (s *Server) authenticate(next http.Handler) http.Handler {
	if !s.Authenticated() {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if !loopbackHost(r.Host) {
				w.Header().Set("Cache-Control", "no-store")
				http.Error(w, "421 misdirected request: without credentials the monitor answers only to a loopback host name (localhost, 127.0.0.1, [::1]); got "+strconv.Quote(r.Host), http.StatusMisdirectedRequest)
				return
			}
			next.ServeHTTP(w, r)
		})
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.authorized(r) {
			next.ServeHTTP(w, r)
			return
		}
		w.Header().Add("WWW-Authenticate", `Basic realm="`+realm+`", charset="UTF-8"`)
		if s.token != "" {
			w.Header().Add("WWW-Authenticate", `Bearer realm="`+realm+`"`)
		}
		w.Header().Set("Cache-Control", "no-store")
		http.Error(w, "401 unauthorized: credentials required", http.StatusUnauthorized)
	})
}

// authorized compares in constant time: both sides are hashed to equal
// lengths first, and every configured credential is checked whatever the
// outcome of the others.
func (s *Server) authorized(r *http.Request) bool {
	ok := 0
	if u, p, has := r.BasicAuth(); has {
		us, ps := sha256.Sum256([]byte(u)), sha256.Sum256([]byte(p))
		if s.user != "" {
			ok |= subtle.ConstantTimeCompare(us[:], s.userSum[:]) & subtle.ConstantTimeCompare(ps[:], s.passSum[:])
		}
		if s.token != "" {
			ok |= subtle.ConstantTimeCompare(ps[:], s.tokenSum[:])
		}
	}
	if s.token != "" {
		if scheme, tok, has := strings.Cut(r.Header.Get("Authorization"), " "); has && strings.EqualFold(scheme, "Bearer") {
			ts := sha256.Sum256([]byte(strings.TrimSpace(tok)))
			ok |= subtle.ConstantTimeCompare(ts[:], s.tokenSum[:])
		}
	}
	return ok == 1
}

// ErrNoCredentials is returned (wrapped) when the server would listen on
// an address other than loopback without credentials.
var ErrNoCredentials = errors.New("no credentials")

// CheckExposure refuses addr when no credentials are set and addr is not a
// loopback address (127.0.0.0/8, ::1, localhost): an empty host or
// 0.0.0.0 listens on every interface.
func CheckExposure(addr string, authenticated bool) error {
	if authenticated {
		return nil
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("address %q: %v", addr, err)
	}
	if isLoopback(host) {
		return nil
	}
	return fmt.Errorf("%w: refusing to listen on %s, which is not a loopback address, without authentication: set %s and %s (HTTP basic auth) or %s (bearer token), or listen on 127.0.0.1",
		ErrNoCredentials, addr, EnvUser, EnvPassword, EnvToken)
}

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}

// ListenAndServe listens on addr (after CheckExposure) and serves until ctx
// ends; see Serve.
func (s *Server) ListenAndServe(ctx context.Context, addr string) error {
	if err := CheckExposure(addr, s.Authenticated()); err != nil {
		return err
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	return s.Serve(ctx, l)
}

// Serve serves on l until ctx ends, then shuts down gracefully: it stops
// accepting, and requests in flight get up to 10s to finish. It closes l.
// Without credentials, l must be on a loopback address.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	if err := CheckExposure(l.Addr().String(), s.Authenticated()); err != nil {
		_ = l.Close()
		return err
	}
	hs := &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		// No WriteTimeout: a report of millions of rows streams for a while.
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(l) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	err := hs.Shutdown(sctx)
	if errors.Is(err, context.DeadlineExceeded) {
		err = hs.Close()
	}
	if serr := <-errc; !errors.Is(serr, http.ErrServerClosed) && err == nil {
		err = serr
	}
	return err
}

// loopbackHost reports whether a Host header names this machine's loopback.
func loopbackHost(hostport string) bool {
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.Trim(host, "[]"), ".")
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
