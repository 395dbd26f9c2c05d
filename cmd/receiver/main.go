// Command receiver takes WeChat Pay's COUPON.USE notifications (核销事件回调通知)
// and records each redemption on its send's record (internal/redeem).
//
// It is a program of its own, not a route of the monitor or the worker:
// WeChat must reach it from the internet, without the monitor's
// credentials, so it serves nothing but the notification path and trusts
// nothing that is not signed with the WeChat Pay key and encrypted under
// the APIv3 key. It needs no merchant private key. Its metrics and health
// are on a second, private address.
//
//	receiver --addr 0.0.0.0:8443 --path /wechatpay/coupon-use
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/couponflow/dispatcher/internal/envflag"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/keyspace"
	"github.com/couponflow/dispatcher/internal/logging"
	"github.com/couponflow/dispatcher/internal/metrics"
	"github.com/couponflow/dispatcher/internal/redeem"
	"github.com/couponflow/dispatcher/internal/redisconn"
	"github.com/couponflow/dispatcher/internal/wechat"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if err != nil {
		os.Exit(envflag.Report(os.Stderr, "receiver", err))
	}
}

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("receiver", flag.ContinueOnError)
	addr := fs.String("addr", "127.0.0.1:8095", "address WeChat's notifications reach (behind TLS termination: WeChat posts to an https notify_url)")
	path := fs.String("path", "/wechatpay/coupon-use", "path of the notify_url; anything else is 404")
	httpAddr := fs.String("http-addr", "127.0.0.1:9093", "private address of /metrics, /healthz and /readyz; empty turns it off")
	redisAddr := fs.String("redis-addr", redisconn.DefaultAddr, "Redis host:port")
	redisURL := fs.String("redis-url", "", "Redis URL, for TLS, Sentinel or Cluster; wins over --redis-addr")
	keyPrefix := fs.String("key-prefix", keyspace.DefaultPrefix, "prefix of every Redis key of ours; the same as the workers'")
	apiV3Key := fs.String("apiv3-key", os.Getenv(wechat.EnvAPIv3Key), "path of the file holding the merchant's APIv3 key (env "+wechat.EnvAPIv3Key+")")
	publicKey := fs.String("public-key", os.Getenv(wechat.EnvPublicKey), "path of the WeChat Pay public key PEM (env "+wechat.EnvPublicKey+")")
	publicKeyID := fs.String("public-key-id", os.Getenv(wechat.EnvPublicKeyID), "its id, PUB_KEY_ID_… (env "+wechat.EnvPublicKeyID+")")
	logFormat := fs.String("log-format", "json", "json or text")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	env := map[string]string{"addr": "RECEIVER_ADDR", "path": "RECEIVER_PATH", "http-addr": "RECEIVER_HTTP_ADDR",
		"redis-addr": redisconn.EnvAddr, "redis-url": redisconn.EnvURL, "key-prefix": keyspace.EnvPrefix,
		"log-format": "LOG_FORMAT", "log-level": "LOG_LEVEL"}
	if err := envflag.Parse(fs, env, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return envflag.Usagef("unexpected argument %q", fs.Arg(0))
	}
	if !strings.HasPrefix(*path, "/") {
		return envflag.Usagef("--path must start with /, got %q", *path)
	}
	if err := keyspace.Validate(*keyPrefix); err != nil {
		return envflag.Usagef("--key-prefix: %v", err)
	}
	log, err := logging.New(os.Stderr, *logFormat, *logLevel)
	if err != nil {
		return &envflag.UsageError{Err: err}
	}
	var missing []string
	for _, m := range [][2]string{{wechat.EnvAPIv3Key, *apiV3Key}, {wechat.EnvPublicKey, *publicKey}, {wechat.EnvPublicKeyID, *publicKeyID}} {
		if strings.TrimSpace(m[1]) == "" {
			missing = append(missing, m[0])
		}
	}
	if len(missing) > 0 {
		return envflag.Usagef("%s not set: the receiver verifies notifications with the WeChat Pay public key and decrypts them with the APIv3 key", strings.Join(missing, ", "))
	}
	key, warnings, err := wechat.LoadAPIv3Key(*apiV3Key)
	if err != nil {
		return err
	}
	for _, w := range warnings {
		log.Warn(w)
	}
	pub, err := wechat.LoadPublicKey(*publicKey)
	if err != nil {
		return fmt.Errorf("%s: %w", wechat.EnvPublicKey, err)
	}
	spec, err := redisconn.Resolve(*redisURL, *redisAddr)
	if err != nil {
		return &envflag.UsageError{Err: err}
	}
	rdb, err := redisconn.OpenSpec(ctx, spec, 64)
	if err != nil {
		return err
	}
	defer rdb.Close()

	reg := prometheus.NewRegistry()
	m := metrics.NewRedemptions()
	if err := m.Register(reg); err != nil {
		return err
	}
	rv, err := redeem.New(redeem.Config{Store: idempotency.New(rdb, idempotency.WithKeys(keyspace.New(*keyPrefix))),
		APIv3Key: key, PublicKey: pub, PublicKeyID: *publicKeyID, Logger: log, Metrics: m})
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.Handle(*path, rv)
	// WeChat waits 5 s for an answer: a request that cannot be read and
	// written within that is of no use to it.
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 5 * time.Second,
		WriteTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug)}
	l, err := net.Listen("tcp", *addr)
	if err != nil {
		return fmt.Errorf("--addr: %w", err)
	}
	servers := []*http.Server{srv}
	errc := make(chan error, 2)
	go func() { errc <- srv.Serve(l) }()
	privAddr := ""
	if *httpAddr != "" {
		pl, err := net.Listen("tcp", *httpAddr)
		if err != nil {
			_ = srv.Close()
			return fmt.Errorf("--http-addr: %w", err)
		}
		privAddr = pl.Addr().String()
		pm := http.NewServeMux()
		pm.Handle("/metrics", metrics.Handler(reg))
		healthz, readyz := metrics.Health(rdb)
		pm.Handle("/healthz", healthz)
		pm.Handle("/readyz", readyz)
		ps := &http.Server{Handler: pm, ReadHeaderTimeout: 5 * time.Second}
		servers = append(servers, ps)
		go func() { errc <- ps.Serve(pl) }()
	}
	log.Info("receiver serving COUPON.USE notifications", "addr", l.Addr().String(), "path", *path,
		"metrics", privAddr, "public_key_id", *publicKeyID)
	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case err = <-errc:
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, s := range servers {
		_ = s.Shutdown(sctx)
	}
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}
