package envflag

import (
	"bytes"
	"errors"
	"flag"
	"io"
	"strings"
	"testing"
)

func parse(t *testing.T, env map[string]string, args ...string) (error, string) {
	t.Helper()
	var out bytes.Buffer
	fs := flag.NewFlagSet("prog", flag.ContinueOnError)
	fs.SetOutput(&out)
	fs.Int("n", 1, "a number")
	return Parse(fs, env, args), out.String()
}

// One convention for every program: -h exits 0 without an error line, a
// usage error 2 with its message printed once, anything else 1.
func TestExitCodes(t *testing.T) {
	err, usage := parse(t, nil, "-h")
	var report bytes.Buffer
	if code := Report(&report, "prog", err); code != 0 || report.Len() != 0 || !strings.Contains(usage, "-n") {
		t.Errorf("-h: exit %d, reported %q, usage %q", code, report.String(), usage)
	}

	err, printed := parse(t, nil, "--nope")
	report.Reset()
	if code := Report(&report, "prog", err); code != 2 || report.Len() != 0 || strings.Count(printed, "not defined: -nope") != 1 {
		t.Errorf("an unknown flag: exit %d, reported %q after the flag package printed %q", code, report.String(), printed)
	}

	t.Setenv("PROG_N", "many")
	err, _ = parse(t, map[string]string{"n": "PROG_N"})
	report.Reset()
	if code := Report(&report, "prog", err); code != 2 || !strings.Contains(report.String(), `prog: PROG_N="many"`) {
		t.Errorf("a bad variable: exit %d, reported %q", code, report.String())
	}

	report.Reset()
	if code := Report(&report, "prog", Usagef("--n must be positive, got %d", -1)); code != 2 || report.String() != "prog: --n must be positive, got -1\n" {
		t.Errorf("a usage error: exit %d, reported %q", code, report.String())
	}
	if code := Report(io.Discard, "prog", errors.New("redis: connection refused")); code != 1 {
		t.Errorf("a runtime error: exit %d", code)
	}
	if code := Report(io.Discard, "prog", nil); code != 0 {
		t.Errorf("no error: exit %d", code)
	}
}
