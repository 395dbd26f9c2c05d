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

	"github.com/couponflow/dispatcher/internal/sandbox"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "wxsandbox:", err)
		os.Exit(1)
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
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := validate(fs, *dataDir, *keyBits, f); err != nil {
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("--log-level: want debug, info, warn or error, got %q", *logLevel)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	srv, err := sandbox.New(sandbox.Config{DataDir: *dataDir, KeyBits: *keyBits, Faults: f, Logger: log, ListPaging: *paging})
	if err != nil {
		return err
	}
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

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
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
	}
	return f.Validate()
}
