// Package sandbox is a local WeChat Pay API v3 server for the coupon APIs,
// faithful enough that the official Go SDK accepts it: it verifies request
// signatures, signs every response with its own WeChat Pay key, decrypts
// RSA-OAEP fields, applies the stock rules and idempotency of the real API,
// and injects faults (rate limit, errors, latency, commit-then-fail, bad
// signatures) on demand. An unsigned admin API under /sandbox/ controls it.
//
// It is an independent implementation of the protocol: it shares no code with
// the client it is used to test, only the SDK's crypto helpers.
package sandbox

import (
	"context"
	"crypto/rsa"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// Config configures a Server.
type Config struct {
	// DataDir holds keys, ids and state across restarts; empty keeps
	// everything in memory (and writes no files).
	DataDir string
	// KeyBits is the RSA key size used when generating keys (default 2048).
	KeyBits int
	Faults  Faults
	Logger  *slog.Logger // default: discard
	// Seed seeds the fault dice; 0 picks a random seed.
	Seed uint64
	// ListPaging is how the user-coupons list reads its offset:
	// PagingItems (default: coupons to skip) or PagingPages (a page
	// number, offset×limit coupons skipped). WeChat's docs allow both
	// readings (see docs/sandbox.md); clients must work under either.
	ListPaging string
	// Now is the sandbox's clock for daily budgets and monthly caps
	// (default time.Now), so that a test can cross midnight, China time.
	Now func() time.Time
	// Notify is how COUPON.USE notifications are delivered and retried
	// (default: WeChat's, one a minute, 9 in all).
	Notify NotifySchedule
}

// The two readings of the list API's offset.
const (
	PagingItems = "items"
	PagingPages = "pages"
)

// Server is a WeChat Pay API v3 sandbox.
type Server struct {
	dir    string
	log    *slog.Logger
	id     identity
	mchKey *rsa.PrivateKey // the merchant's key: its public half verifies requests
	wxKey  *rsa.PrivateKey // the WeChat Pay key: signs responses, decrypts fields
	// apiV3Key is the merchant's APIv3 key: it encrypts notifications.
	apiV3Key string
	notifier *notifier

	handler http.Handler
	paging  string // PagingItems or PagingPages
	nonces  *nonceCache
	faults  atomic.Pointer[Faults]
	limiter atomic.Pointer[rate.Limiter]
	hook    atomic.Pointer[func(RecordedRequest)]
	rngMu   sync.Mutex
	rng     *rand.Rand
	bootID  string
	reqSeq  atomic.Uint64

	now func() time.Time

	inflightMu sync.Mutex
	inflight   map[string]int // sends in flight by openid (Faults.UserConflict)

	mu     sync.Mutex // guards st
	st     *store
	saveMu sync.Mutex

	srvMu   sync.Mutex
	srv     *http.Server
	url     string
	closed  bool
	ready   chan struct{}
	readyMu sync.Once

	stopSaver chan struct{}
	saverDone chan struct{}
	closeOnce sync.Once
	closeErr  error
}

// New loads the sandbox kept in cfg.DataDir, or creates it: keys, ids, the
// default stocks and sandbox.env.
func New(cfg Config) (*Server, error) {
	if err := cfg.Faults.Validate(); err != nil {
		return nil, fmt.Errorf("faults: %w", err)
	}
	if cfg.KeyBits == 0 {
		cfg.KeyBits = 2048
	}
	if cfg.KeyBits < 1024 {
		return nil, fmt.Errorf("key bits must be at least 1024, got %d", cfg.KeyBits)
	}
	switch cfg.ListPaging {
	case "":
		cfg.ListPaging = PagingItems
	case PagingItems, PagingPages:
	default:
		return nil, fmt.Errorf("list paging must be %q or %q, got %q", PagingItems, PagingPages, cfg.ListPaging)
	}
	s := &Server{
		log:    cfg.Logger,
		nonces: newNonceCache(),
		st:     newStore(),
		bootID: strings.ToUpper(hex.EncodeToString(randBytes(8))),
		ready:  make(chan struct{}),
		paging: cfg.ListPaging,
		now:    cfg.Now,

		inflight: map[string]int{},
		notifier: newNotifier(cfg.Notify),
	}
	if s.now == nil {
		s.now = time.Now
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	seed := cfg.Seed
	if seed == 0 {
		seed = rand.Uint64()
	}
	s.rng = rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	s.SetFaults(cfg.Faults)

	if cfg.DataDir != "" {
		dir, err := filepath.Abs(cfg.DataDir)
		if err != nil {
			return nil, err
		}
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, err
		}
		s.dir = dir
	}
	if err := s.loadKeys(cfg.KeyBits); err != nil {
		return nil, err
	}
	if err := s.loadAPIv3Key(); err != nil {
		return nil, err
	}
	fresh, err := s.loadIdentity()
	if err != nil {
		return nil, err
	}
	if err := s.loadState(); err != nil {
		return nil, err
	}
	before := s.id
	if err := s.ensureDefaultStocks(); err != nil {
		return nil, err
	}
	if fresh || s.id != before {
		if err := s.saveIdentity(); err != nil {
			return nil, err
		}
	}
	if s.dir != "" {
		if err := s.save(); err != nil {
			return nil, err
		}
		if err := s.WriteEnvFile(); err != nil {
			return nil, err
		}
		s.stopSaver, s.saverDone = make(chan struct{}), make(chan struct{})
		go s.saveLoop()
	}
	s.handler = s.routes()
	return s, nil
}

// ensureDefaultStocks (re)creates the stocks named in sandbox.json, so a lost
// state.json still leaves SANDBOX_STOCK_ID usable.
func (s *Server) ensureDefaultStocks() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, d := range []struct {
		id   *string
		spec StockSpec
	}{
		{&s.id.StockID, StockSpec{Kind: KindFavor, Budget: 1_000_000, MaxPerUser: 1, CouponValue: 100, CouponMinimum: 100}},
		{&s.id.MultiuseStockID, StockSpec{Kind: KindMultiuse, Budget: 1_000_000}},
	} {
		if *d.id != "" && s.st.stocks[*d.id] != nil {
			continue
		}
		d.spec.ID = *d.id
		k, err := s.createStockLocked(d.spec)
		if err != nil {
			return err
		}
		*d.id = k.ID
	}
	return nil
}

func (s *Server) path(name string) string { return filepath.Join(s.dir, name) }

// DataDir returns the absolute data directory, or "" in memory mode.
func (s *Server) DataDir() string { return s.dir }

// Handler returns the HTTP handler: the API under /v3/, the admin API under
// /sandbox/.
func (s *Server) Handler() http.Handler { return s.handler }

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("POST /v3/marketing/favor/users/{openid}/coupons", s.api(s.sendFavor))
	mux.Handle("GET /v3/marketing/favor/users/{openid}/coupons", s.api(s.listCoupons))
	mux.Handle("POST /v3/multiuse/users/{openid}/coupons", s.api(s.sendMultiuse))
	mux.Handle("GET /v3/marketing/favor/stocks/{stock_id}", s.api(s.queryStock))
	mux.Handle("POST /v3/marketing/favor/callbacks", s.api(s.setCallback))
	mux.Handle("GET /v3/marketing/favor/callbacks", s.api(s.queryCallback))
	mux.Handle("/v3/", s.api(notFound))
	s.adminRoutes(mux)
	unclean := s.api(uncleanPath)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// ServeMux answers an unclean path with an unsigned redirect; the API
		// must answer it like any other request.
		if strings.HasPrefix(r.URL.Path, "/v3/") && path.Clean(r.URL.Path) != r.URL.Path {
			unclean(w, r)
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// Serve serves on l until Shutdown or Close; call it once. It sets URL from
// l's address and, with a DataDir, rewrites sandbox.env with it before
// accepting, then closes Ready. It returns nil once the server is shut down.
func (s *Server) Serve(l net.Listener) error {
	srv := &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	s.srvMu.Lock()
	if s.closed || s.srv != nil {
		s.srvMu.Unlock()
		if s.closed {
			return http.ErrServerClosed
		}
		return errors.New("sandbox: Serve may be called only once")
	}
	s.srv = srv
	s.url = "http://" + advertised(l.Addr())
	s.srvMu.Unlock()
	if err := s.WriteEnvFile(); err != nil && s.dir != "" {
		return err
	}
	s.readyMu.Do(func() { close(s.ready) })
	if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// advertised turns a wildcard listen address into one a client can dial.
func advertised(a net.Addr) string {
	if t, ok := a.(*net.TCPAddr); ok && (t.IP == nil || t.IP.IsUnspecified()) {
		return net.JoinHostPort("127.0.0.1", fmt.Sprint(t.Port))
	}
	return a.String()
}

// Ready is closed once Serve has set URL (and written sandbox.env).
func (s *Server) Ready() <-chan struct{} { return s.ready }

// URL returns the base URL, e.g. http://127.0.0.1:8090, once serving.
func (s *Server) URL() string {
	s.srvMu.Lock()
	defer s.srvMu.Unlock()
	return s.url
}

// Shutdown stops serving gracefully (see http.Server.Shutdown) without
// persisting; call Close after it.
func (s *Server) Shutdown(ctx context.Context) error {
	s.srvMu.Lock()
	srv := s.srv
	s.srvMu.Unlock()
	if srv == nil {
		return nil
	}
	return srv.Shutdown(ctx)
}

// Close stops serving at once, stops the periodic save and persists the
// state. It is safe to call more than once.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.srvMu.Lock()
		s.closed = true
		srv := s.srv
		s.srvMu.Unlock()
		if srv != nil {
			_ = srv.Close()
		}
		// Deliveries in flight stop; those not yet acknowledged are lost
		// with the process (WeChat's are not: sync finds them).
		s.notifier.stop()
		if s.stopSaver != nil {
			close(s.stopSaver)
			<-s.saverDone
		}
		s.closeErr = s.save()
	})
	return s.closeErr
}

// Env returns the variables that configure a client for this sandbox.
// Key paths are empty in memory mode, as is WECHATPAY_BASE_URL before Serve.
func (s *Server) Env() map[string]string {
	m := map[string]string{
		"WECHATPAY_MCHID":           s.id.MchID,
		"WECHATPAY_MCH_SERIAL":      s.id.MchSerial,
		"WECHATPAY_PRIVATE_KEY":     "",
		"WECHATPAY_PUBLIC_KEY":      "",
		"WECHATPAY_APIV3_KEY":       "",
		"WECHATPAY_PUBLIC_KEY_ID":   s.id.PublicKeyID,
		"WECHATPAY_APPID":           s.id.AppID,
		"WECHATPAY_BASE_URL":        s.URL(),
		"SANDBOX_STOCK_ID":          s.id.StockID,
		"SANDBOX_MULTIUSE_STOCK_ID": s.id.MultiuseStockID,
	}
	if s.dir != "" {
		m["WECHATPAY_PRIVATE_KEY"] = s.path(MerchantKeyFile)
		m["WECHATPAY_PUBLIC_KEY"] = s.path(PublicKeyFile)
		m["WECHATPAY_APIV3_KEY"] = s.path(APIv3KeyFile)
	}
	return m
}

var envOrder = []string{
	"WECHATPAY_MCHID", "WECHATPAY_MCH_SERIAL", "WECHATPAY_PRIVATE_KEY", "WECHATPAY_PUBLIC_KEY",
	"WECHATPAY_PUBLIC_KEY_ID", "WECHATPAY_APIV3_KEY", "WECHATPAY_APPID", "WECHATPAY_BASE_URL",
	"SANDBOX_STOCK_ID", "SANDBOX_MULTIUSE_STOCK_ID",
}

// EnvText returns sandbox.env's content.
func (s *Server) EnvText() string {
	env := s.Env()
	var b strings.Builder
	b.WriteString("# WeChat Pay sandbox. Load with: set -a; . ./sandbox.env; set +a\n")
	for _, k := range envOrder {
		fmt.Fprintf(&b, "%s=%s\n", k, shellQuote(env[k]))
	}
	return b.String()
}

func shellQuote(v string) string {
	if strings.IndexFunc(v, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("_-./:@+,=", r))
	}) < 0 {
		return v
	}
	return "'" + strings.ReplaceAll(v, "'", `'\''`) + "'"
}

// WriteEnvFile writes DataDir/sandbox.env; an error in memory mode.
func (s *Server) WriteEnvFile() error {
	if s.dir == "" {
		return errors.New("sandbox: no data dir to write sandbox.env to")
	}
	return writeFileAtomic(s.path(EnvFile), []byte(s.EnvText()), 0o644)
}
