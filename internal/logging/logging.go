// Package logging sets up log/slog for the programs and adapts it for
// asynq, so that one process writes one stream of structured lines.
package logging

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
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
func (a Asynq) Warn(args ...any)  { a.L.Warn(fmt.Sprint(args...), "component", "asynq") }
func (a Asynq) Error(args ...any) { a.L.Error(fmt.Sprint(args...), "component", "asynq") }
func (a Asynq) Fatal(args ...any) {
	a.L.Error(fmt.Sprint(args...), "component", "asynq")
	os.Exit(1)
}
