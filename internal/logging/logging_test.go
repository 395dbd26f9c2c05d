package logging

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

func lines(t *testing.T, b *bytes.Buffer) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(b.String()), "\n") {
		if l == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("not a JSON line: %q", l)
		}
		out = append(out, m)
	}
	return out
}

// asynq's "Retry exhausted" follows every deliberate SkipRetry: an
// info line that says what it means, not a warning.
func TestAsynqArchiveIsNoWarning(t *testing.T) {
	var b bytes.Buffer
	a := Asynq{L: slog.New(slog.NewJSONHandler(&b, nil))}
	a.Warn("Retry exhausted for task id=send:1900000001:r1")
	a.Warn("Failed to write server state data: boom")
	got := lines(t, &b)
	if len(got) != 2 || got[0]["level"] != "INFO" || got[0]["task_id"] != "send:1900000001:r1" || got[1]["level"] != "WARN" {
		t.Fatalf("lines %v", got)
	}
}

// go-redis's own complaints join the structured stream.
func TestRedisLinesAreStructured(t *testing.T) {
	var b bytes.Buffer
	RouteRedis(slog.New(slog.NewJSONHandler(&b, nil)))
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", MaxRetries: -1, DialTimeout: 100 * time.Millisecond, PoolSize: 1})
	defer rdb.Close()
	for i := 0; i < 10; i++ {
		_ = rdb.Ping(context.Background()).Err()
	}
	got := lines(t, &b)
	if len(got) == 0 {
		t.Fatal("go-redis logged nothing for ten refused connections: the test no longer sees its lines")
	}
	for _, l := range got {
		if l["component"] != "go-redis" || l["level"] != "WARN" {
			t.Fatalf("line %v", l)
		}
	}
}
