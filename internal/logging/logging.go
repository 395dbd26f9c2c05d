// Package logging sets up log/slog for the programs and adapts it for
// asynq, so that one process writes one stream of structured lines.
package logging

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/redis/go-redis/v9"
)

// New returns a logger writing format ("json" or "text") at level
// ("debug", "info", "warn", "error") to w.
func New(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch strings.ToLower(format) {
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	case "text", "":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("log format %q: want json or text", format)
}

// Asynq adapts a slog.Logger to asynq.Logger.
type Asynq struct{ L *slog.Logger }

func (a Asynq) Debug(args ...any) { a.L.Debug(fmt.Sprint(args...), "component", "asynq") }
func (a Asynq) Info(args ...any)  { a.L.Info(fmt.Sprint(args...), "component", "asynq") }
func (a Asynq) Warn(args ...any) {
	msg := fmt.Sprint(args...)
	if id, ok := strings.CutPrefix(msg, "Retry exhausted for task id="); ok {
		// asynq says this of every SkipRetry too, and the dispatcher never
		// lets a task's counted retries run out: each such task is a send
		// that ended (succeeded, failed or unknown) and is archived by design.
		a.L.Info("task archived: its send has ended, as its record says", "component", "asynq", "task_id", id)
		return
	}
	a.L.Warn(msg, "component", "asynq")
}
func (a Asynq) Error(args ...any) { a.L.Error(fmt.Sprint(args...), "component", "asynq") }
func (a Asynq) Fatal(args ...any) {
	a.L.Error(fmt.Sprint(args...), "component", "asynq")
	os.Exit(1)
}

// Redis adapts a slog.Logger to go-redis's logger, whose default writes
// plain lines (redis: … pool.go:…) into the structured stream.
type Redis struct{ L *slog.Logger }

func (r Redis) Printf(_ context.Context, format string, v ...any) {
	r.L.Warn(fmt.Sprintf(format, v...), "component", "go-redis")
}

// RouteRedis sends go-redis's own log lines to l, for the whole process.
func RouteRedis(l *slog.Logger) { redis.SetLogger(Redis{L: l}) }
