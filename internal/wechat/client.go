// Package wechat is a client for the WeChat Pay API v3 calls the
// dispatcher makes: send a cash coupon, list a user's coupons, send
// consumer funds, and query a stock before a campaign. It is built on the official SDK, which signs requests and
// verifies responses; this package adds typed requests, a base URL, and a
// classification of every outcome (see Class) that tells the caller whether
// and how to retry.
package wechat

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/wechatpay-apiv3/wechatpay-go/core"
	"github.com/wechatpay-apiv3/wechatpay-go/core/option"
)

// Client calls WeChat Pay. It is safe for concurrent use.
type Client struct {
	sdk       *core.Client
	mchID     string
	appID     string
	encryptor *Encryptor
	timeout   time.Duration // of one call, signing to verified answer
}

type options struct {
	concurrency    int
	dialTimeout    time.Duration
	requestTimeout time.Duration
	logger         *slog.Logger
}

// Option configures a Client.
type Option func(*options)

// WithConcurrency sizes the connection pool for n calls in flight at once.
func WithConcurrency(n int) Option {
	return func(o *options) {
		if n > 0 {
			o.concurrency = n
		}
	}
}

// WithTimeouts sets the deadline for establishing a connection and for a
// whole call. A call that times out is Ambiguous: keep the second well
// above WeChat's usual latency so that few calls end that way.
func WithTimeouts(dial, request time.Duration) Option {
	return func(o *options) {
		if dial > 0 {
			o.dialTimeout = dial
		}
		if request > 0 {
			o.requestTimeout = request
		}
	}
}

// WithLogger sets where key warnings go (default slog.Default()).
func WithLogger(l *slog.Logger) Option {
	return func(o *options) { o.logger = l }
}

// New builds a client in public-key mode (the WeChat Pay public key and its
// PUB_KEY_ID verify responses and encrypt sensitive fields). It reads the
// key files named by cfg and fails with a message naming the variable at
// fault.
func New(ctx context.Context, cfg Config, opts ...Option) (*Client, error) {
	o := &options{concurrency: 16, dialTimeout: 5 * time.Second, requestTimeout: 15 * time.Second, logger: slog.Default()}
	for _, opt := range opts {
		opt(o)
	}
	keys, err := cfg.LoadKeys()
	if err != nil {
		return nil, err
	}
	for _, w := range keys.Warnings {
		o.logger.Warn(w)
	}
	base, _ := parseBaseURL(cfg.BaseURL) // checked by LoadKeys
	sdk, err := core.NewClient(ctx,
		option.WithWechatPayPublicKeyAuthCipher(cfg.MchID, cfg.MchSerial, keys.Private, cfg.PublicKeyID, keys.Public),
		option.WithHTTPClient(newHTTPClient(base, o)),
	)
	if err != nil {
		return nil, fmt.Errorf("wechatpay: building the SDK client: %w", err)
	}
	return &Client{
		sdk:       sdk,
		mchID:     cfg.MchID,
		appID:     cfg.AppID,
		encryptor: NewEncryptor(cfg.PublicKeyID, keys.Public),
		timeout:   o.requestTimeout,
	}, nil
}

// call bounds one call by the request timeout through its context rather
// than http.Client.Timeout: with a RoundTripper of ours in front of the
// transport (the base-URL rewrite), net/http enforces a client timeout
// with a goroutine and a timer per request, which outlive the call by the
// whole timeout, since the SDK replaces the response body without closing
// it (200 calls left 200 goroutines behind).
func (c *Client) call(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, c.timeout)
}

// MchID is the merchant this client signs for.
func (c *Client) MchID() string { return c.mchID }

// AppID is the configured appid, the default for requests that leave it empty.
func (c *Client) AppID() string { return c.appID }

// Encryptor encrypts sensitive fields under the key this client's requests
// name in Wechatpay-Serial.
func (c *Client) Encryptor() *Encryptor { return c.encryptor }
