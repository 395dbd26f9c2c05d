// Package sandboxtest starts WeChat Pay sandboxes for tests and builds clients
// of them with the official SDK.
package sandboxtest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"testing"
	"time"

	"github.com/wechatpay-apiv3/wechatpay-go/core"
	"github.com/wechatpay-apiv3/wechatpay-go/core/option"

	"github.com/couponflow/dispatcher/internal/sandbox"
)

// Start serves a new sandbox kept in tb.TempDir() on a free 127.0.0.1 port;
// tb.Cleanup closes it. Options adjust the config before it starts.
func Start(tb testing.TB, opts ...func(*sandbox.Config)) *sandbox.Server {
	tb.Helper()
	s, stop, err := serve(tb.TempDir(), opts)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := stop(); err != nil {
			tb.Error(err)
		}
	})
	return s
}

// ForMain is Start for a whole test binary (its TestMain), for code that
// has no testing.TB: a package's examples, or one sandbox its tests share
// because generating RSA keys is slow. stop closes it and removes its
// directory.
func ForMain(opts ...func(*sandbox.Config)) (s *sandbox.Server, stop func(), err error) {
	dir, err := os.MkdirTemp("", "sandboxtest-")
	if err != nil {
		return nil, nil, err
	}
	s, closeIt, err := serve(dir, opts)
	if err != nil {
		os.RemoveAll(dir)
		return nil, nil, err
	}
	return s, func() { _ = closeIt(); os.RemoveAll(dir) }, nil
}

func serve(dir string, opts []func(*sandbox.Config)) (*sandbox.Server, func() error, error) {
	cfg := sandbox.Config{DataDir: dir}
	for _, o := range opts {
		o(&cfg)
	}
	s, err := sandbox.New(cfg)
	if err != nil {
		return nil, nil, fmt.Errorf("sandboxtest: %w", err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		_ = s.Close()
		return nil, nil, fmt.Errorf("sandboxtest: listen: %w", err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	select {
	case <-s.Ready():
	case err := <-done:
		_ = s.Close()
		return nil, nil, fmt.Errorf("sandboxtest: serve: %w", err)
	}
	stop := func() error {
		var errs []error
		if err := s.Close(); err != nil {
			errs = append(errs, fmt.Errorf("sandboxtest: close: %w", err))
		}
		if err := <-done; err != nil {
			errs = append(errs, fmt.Errorf("sandboxtest: serve: %w", err))
		}
		return errors.Join(errs...)
	}
	return s, stop, nil
}

// KeyBits sets the RSA key size generated for the sandbox (default 2048).
func KeyBits(n int) func(*sandbox.Config) { return func(c *sandbox.Config) { c.KeyBits = n } }

// WithFaults starts the sandbox with faults in force.
func WithFaults(f sandbox.Faults) func(*sandbox.Config) {
	return func(c *sandbox.Config) { c.Faults = f }
}

// WithLogger sets the sandbox's logger (default: discard).
func WithLogger(l *slog.Logger) func(*sandbox.Config) {
	return func(c *sandbox.Config) { c.Logger = l }
}

// Transport sends requests addressed to any host to the sandbox instead:
// the SDK hard-codes https://api.mch.weixin.qq.com, and the request signature
// covers only the path and query.
type Transport struct {
	Base *url.URL          // the sandbox, e.g. from url.Parse(s.URL())
	Next http.RoundTripper // default http.DefaultTransport
}

// RoundTrip implements http.RoundTripper.
func (t *Transport) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.URL.Scheme, r.URL.Host, r.Host = t.Base.Scheme, t.Base.Host, t.Base.Host
	next := t.Next
	if next == nil {
		next = http.DefaultTransport
	}
	return next.RoundTrip(r)
}

// HTTPClient returns an http.Client that talks to s whatever host a request
// names.
func HTTPClient(s *sandbox.Server) *http.Client {
	u, err := url.Parse(s.URL())
	if err != nil || u.Host == "" {
		panic("sandboxtest: sandbox is not serving: " + s.URL())
	}
	return &http.Client{Transport: &Transport{Base: u}, Timeout: 30 * time.Second}
}

// SDKClient returns an SDK client of s in public-key mode, as a merchant
// would configure it.
func SDKClient(tb testing.TB, s *sandbox.Server) *core.Client {
	tb.Helper()
	id := s.Identity()
	c, err := core.NewClient(context.Background(),
		option.WithWechatPayPublicKeyAuthCipher(id.MchID, id.MchSerial, id.MerchantKey, id.PublicKeyID, id.PublicKey),
		option.WithHTTPClient(HTTPClient(s)),
	)
	if err != nil {
		tb.Fatalf("sandboxtest: sdk client: %v", err)
	}
	return c
}
