package redisconn

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/redistest"
)

func TestOpenSpecStandalone(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	srv := redistest.Start(t)

	for _, raw := range []string{srv.Addr, "redis://" + srv.Addr, "redis://" + srv.Addr + "/0"} {
		c := openURL(t, raw)
		if err := c.Set(ctx, "k", raw, 0).Err(); err != nil {
			t.Fatalf("%s: SET: %v", raw, err)
		}
		if got := srv.Client().Get(ctx, "k").Val(); got != raw {
			t.Errorf("%s: the key reads %q on the server", raw, got)
		}
	}

	// The database number selects the database.
	c := openURL(t, "redis://"+srv.Addr+"/3")
	if err := c.Set(ctx, "in-db-3", "yes", 0).Err(); err != nil {
		t.Fatal(err)
	}
	direct := redis.NewClient(&redis.Options{Addr: srv.Addr, DB: 3})
	defer direct.Close()
	if got := direct.Get(ctx, "in-db-3").Val(); got != "yes" {
		t.Errorf("database 3 holds %q", got)
	}

	// The pool is sized as asked, and at least 10.
	for _, n := range []struct{ ask, want int }{{3, 10}, {42, 42}} {
		spec, _ := ParseURL(srv.Addr)
		c, err := OpenSpec(ctx, spec, n.ask)
		if err != nil {
			t.Fatal(err)
		}
		if got := c.(*redis.Client).Options().PoolSize; got != n.want {
			t.Errorf("pool for %d: %d, want %d", n.ask, got, n.want)
		}
		_ = c.Close()
	}

	// Open, as callers use it today, still works.
	old, err := Open(ctx, srv.Addr, 5)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if err := old.Ping(ctx).Err(); err != nil {
		t.Fatal(err)
	}
}

func TestOpenSpecPasswords(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	const pw = "S3cr3t/@?Xyz9"
	srv := redistest.Start(t, "--requirepass", pw, "--user", "alice", "on", ">"+pw, "~*", "&*", "+@all")
	enc := "S3cr3t%2F%40%3FXyz9"

	for _, raw := range []string{"redis://:" + enc + "@" + srv.Addr, "redis://alice:" + enc + "@" + srv.Addr} {
		c := openURL(t, raw)
		if err := c.Set(ctx, "k", "v", 0).Err(); err != nil {
			t.Errorf("%s: %v", Redact(raw), err)
		}
	}
	for _, tc := range []struct{ raw, says string }{
		{"redis://:wrong" + secretA + secretB + "@" + srv.Addr, "WRONGPASS"},
		{"redis://alice:wrong" + secretA + secretB + "@" + srv.Addr, "WRONGPASS"},
		{"redis://" + srv.Addr, "NOAUTH"},
	} {
		spec, err := ParseURL(tc.raw)
		if err != nil {
			t.Fatal(err)
		}
		spec.Source = "REDIS_URL"
		_, err = OpenSpec(ctx, spec, 10)
		if err == nil {
			t.Fatalf("%s: connected", Redact(tc.raw))
		}
		msg := err.Error()
		t.Logf("%s", msg)
		if !strings.Contains(msg, "redis at "+spec.String()+" (REDIS_URL) does not answer") || !strings.Contains(msg, tc.says) {
			t.Errorf("error %q should name %s, REDIS_URL and say %s", msg, spec, tc.says)
		}
		assertNoSecret(t, "error", msg)
	}
}

func TestOpenSpecUnreachable(t *testing.T) {
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close() // nothing listens there now
	for _, raw := range []string{
		"redis://:" + secretA + secretB + "@" + addr,
		"redis-cluster://:" + secretA + secretB + "@" + addr,
		"redis-sentinel://" + addr + "/mymaster?sentinel_password=" + secretA + secretB,
	} {
		spec, err := ParseURL(raw)
		if err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		_, err = OpenSpec(context.Background(), spec, 10)
		if err == nil {
			t.Fatalf("%s: connected", spec)
		}
		t.Logf("%s: failed in %v", spec.Kind(), time.Since(t0))
		msg := err.Error()
		t.Logf("%s", msg)
		if !strings.HasPrefix(msg, "redis at "+spec.String()+" (REDIS_URL) does not answer") {
			t.Errorf("error %q does not start by naming %s and REDIS_URL", msg, spec)
		}
		assertNoSecret(t, "error", msg)
	}
}

func TestOpenSpecTLS(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	srv := redistest.StartTLS(t)
	c := openURL(t, "rediss://"+srv.Addr+"?insecure_skip_verify=true")
	if err := c.Set(ctx, "over-tls", "yes", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if got := srv.Client().Get(ctx, "over-tls").Val(); got != "yes" {
		t.Errorf("over-tls = %q", got)
	}
	// Without skipping verification, the self-signed certificate is refused;
	// without TLS, the server does not answer.
	for _, tc := range []struct{ raw, says string }{
		{"rediss://" + srv.Addr, "certificate"},
		{"redis://" + srv.Addr, "does not answer"},
	} {
		spec, _ := ParseURL(tc.raw)
		_, err := OpenSpec(ctx, spec, 10)
		if err == nil || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("%s: %v, want an error saying %q", tc.raw, err, tc.says)
		}
	}
}
