// Command wxsandbox serves a local WeChat Pay API v3 sandbox for the coupon
// APIs (see docs/sandbox.md).
//
//	go run ./cmd/wxsandbox --addr 127.0.0.1:8090 --data-dir .demo/sandbox
//	set -a; . .demo/sandbox/sandbox.env; set +a
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/couponflow/dispatcher/internal/envflag"
	"github.com/couponflow/dispatcher/internal/sandbox"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		os.Exit(envflag.Report(os.Stderr, "wxsandbox", err))
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("wxsandbox", flag.ContinueOnError)
	addr := fs.String("addr", "127.0.0.1:8090", "listen address (port 0 picks a free port)")
	dataDir := fs.String("data-dir", "", "directory for keys, ids, state and sandbox.env (required)")
	keyBits := fs.Int("key-bits", 2048, "RSA key size used when generating keys")
	paging := fs.String("list-paging", sandbox.PagingItems, "how the coupon list reads offset: items (coupons to skip) or pages (a page number); WeChat's docs allow both")
	var f sandbox.Faults
	fs.Float64Var(&f.RateLimit, "rate-limit", 0, "API requests per second before 429 FREQUENCY_LIMIT_EXCEED (0 = none)")
	fs.Float64Var(&f.ErrorRate, "error-rate", 0, "probability of 500 SYSTEM_ERROR before anything is committed")
	fs.DurationVar(&f.Latency, "latency", 0, "delay added before answering")
	fs.Float64Var(&f.LatencyRate, "latency-rate", 0, "probability of --latency (default 1 when --latency is set)")
	fs.Float64Var(&f.CommitFailRate, "commit-fail-rate", 0, "probability that a send is committed but answered with 500 or a dropped connection")
	fs.StringVar(&f.CommitFailMode, "commit-fail-mode", "", `how a commit fails: "500", "drop", or "" for either`)
	fs.Float64Var(&f.BadSignatureRate, "bad-signature-rate", 0, "probability that a 2xx carries a wrong Wechatpay-Signature")
	fs.StringVar(&f.RateLimitAnswer, "rate-limit-answer", "", `how the excess over --rate-limit is refused: "429" (FREQUENCY_LIMIT_EXCEED, default), "invalid_request" (400 调用频率过高) or "frequency_limited" (403 FREQUENCY_LIMITED)`)
	fs.Float64Var(&f.AcceptedRate, "accepted-rate", 0, "probability that a send is issued and answered 202 with no body (the same request again gets the coupon)")
	fs.BoolVar(&f.UserConflict, "user-conflict", false, "refuse a send to an openid while another send to it is in flight with a false 403 REQUEST_BLOCKED")
	fs.Int64Var(&f.MonthlyCapPerUser, "monthly-cap-per-user", 0, "coupons one openid may receive per month, China time, before 400 INVALID_REQUEST 暂时无法领取 (0 = no cap)")
	fs.BoolVar(&f.SignError, "sign-error", false, "refuse every API request with 401 SIGN_ERROR, as for a merchant whose clock or key is wrong")
	var ns sandbox.NotifySchedule
	fs.DurationVar(&ns.Interval, "notify-interval", sandbox.DefaultNotifyInterval, "time between deliveries of an unacknowledged COUPON.USE notification (WeChat: 1m; compress it for tests)")
	fs.IntVar(&ns.Attempts, "notify-attempts", sandbox.DefaultNotifyAttempts, "deliveries of one notification before giving up (WeChat: 9)")
	fs.Float64Var(&f.NotifyDuplicateRate, "notify-duplicate-rate", 0, "probability that an acknowledged notification is delivered once more")
	fs.Int64Var(&f.NotifyDelayMS, "notify-delay-ms", 0, "milliseconds before a notification's first delivery")
	fs.Int64Var(&f.NotifyJitterMS, "notify-jitter-ms", 0, "a random 0..N more milliseconds before the first delivery, so notifications arrive out of order")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	if err := envflag.Parse(fs, nil, args); err != nil {
		return err
	}
	if err := validate(fs, *dataDir, *keyBits, f); err != nil {
		return &envflag.UsageError{Err: err}
	}
	if ns.Interval <= 0 || ns.Attempts < 1 {
		return envflag.Usagef("--notify-interval must be > 0 and --notify-attempts >= 1, got %v and %d", ns.Interval, ns.Attempts)
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return envflag.Usagef("--log-level: want debug, info, warn or error, got %q", *logLevel)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	srv, err := sandbox.New(sandbox.Config{DataDir: *dataDir, KeyBits: *keyBits, Faults: f, Logger: log, ListPaging: *paging, Notify: ns})
	if err != nil {
		return err
	}
	// Before it listens: a SIGTERM sent as soon as it answers (a test, an
	// orchestrator) must shut it down gracefully, not kill it.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	l, err := net.Listen("tcp", *addr)
	if err != nil {
		_ = srv.Close()
		return fmt.Errorf("--addr: %w", err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	select {
	case <-srv.Ready():
	case err := <-served:
		_ = srv.Close()
		return err
	}
	id := srv.Identity()
	log.Info("wxsandbox serving the WeChat Pay API v3 sandbox",
		"url", srv.URL(), "data_dir", srv.DataDir(), "env_file", filepath.Join(srv.DataDir(), sandbox.EnvFile),
		"admin", srv.URL()+"/sandbox/ (no signature needed)",
		"mchid", id.MchID, "stock_id", id.StockID, "multiuse_stock_id", id.MultiuseStockID, "faults", f)

	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case err = <-served:
		log.Error("serve", "err", err)
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if serr := srv.Shutdown(sctx); serr != nil {
		log.Warn("graceful shutdown", "err", serr)
	}
	if cerr := srv.Close(); cerr != nil {
		return errors.Join(err, cerr)
	}
	return err
}

// validate checks the flags by name; Faults.Validate would name JSON fields.
func validate(fs *flag.FlagSet, dataDir string, keyBits int, f sandbox.Faults) error {
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if dataDir == "" {
		return errors.New("--data-dir is required: the sandbox keeps its keys, ids and state there")
	}
	if keyBits < 1024 || keyBits > 8192 {
		return fmt.Errorf("--key-bits must be between 1024 and 8192, got %d", keyBits)
	}
	for _, p := range []struct {
		flag string
		v    float64
	}{
		{"--error-rate", f.ErrorRate}, {"--latency-rate", f.LatencyRate},
		{"--commit-fail-rate", f.CommitFailRate}, {"--bad-signature-rate", f.BadSignatureRate},
		{"--accepted-rate", f.AcceptedRate},
		{"--notify-duplicate-rate", f.NotifyDuplicateRate},
	} {
		if !(p.v >= 0 && p.v <= 1) {
			return fmt.Errorf("%s must be a probability between 0 and 1, got %v", p.flag, p.v)
		}
	}
	switch m := f.CommitFailMode; {
	case !(f.RateLimit >= 0) || math.IsInf(f.RateLimit, 0):
		return fmt.Errorf("--rate-limit must be a number of requests per second >= 0, got %v", f.RateLimit)
	case f.Latency < 0:
		return fmt.Errorf("--latency must be >= 0, got %v", f.Latency)
	case m != "" && m != sandbox.CommitFail500 && m != sandbox.CommitFailDrop:
		return fmt.Errorf(`--commit-fail-mode must be "500", "drop" or empty, got %q`, m)
	case f.RateLimitAnswer != "" && f.RateLimitAnswer != sandbox.RateLimit429 && f.RateLimitAnswer != sandbox.RateLimitInvalidRequest && f.RateLimitAnswer != sandbox.RateLimitFrequencyLimited:
		return fmt.Errorf(`--rate-limit-answer must be "429", "invalid_request" or "frequency_limited", got %q`, f.RateLimitAnswer)
	case f.MonthlyCapPerUser < 0:
		return fmt.Errorf("--monthly-cap-per-user must be >= 0 (0 = no cap), got %d", f.MonthlyCapPerUser)
	}
	return f.Validate()
}
