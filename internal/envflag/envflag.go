// Package envflag lets environment variables set flags: the variable sets
// the value, a flag on the command line overrides it, and a bad value in
// either is an error naming both.
package envflag

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
)

// UsageError is a command line or environment a program cannot run with:
// a bad flag, a bad variable, a missing setting. Programs exit 2 on it.
type UsageError struct {
	Err error
	// Printed: the flag package has already printed the error and the
	// usage, so it is not printed again.
	Printed bool
}

func (e *UsageError) Error() string { return e.Err.Error() }
func (e *UsageError) Unwrap() error { return e.Err }

// Usagef is a UsageError with a message of its own.
func Usagef(format string, args ...any) error {
	return &UsageError{Err: fmt.Errorf(format, args...)}
}

// Code is the exit status for what a program's run returned: 0 for
// nothing or a request for help (-h, which has printed the usage), 2 for
// a usage error, 1 for anything else.
func Code(err error) int {
	var ue *UsageError
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &ue):
		return 2
	}
	return 1
}

// Report prints err once, after the program's name, unless -h asked for
// help or the flag package has printed it already, and returns Code(err).
func Report(w io.Writer, prog string, err error) int {
	var ue *UsageError
	if err != nil && !errors.Is(err, flag.ErrHelp) && !(errors.As(err, &ue) && ue.Printed) {
		fmt.Fprintf(w, "%s: %v\n", prog, err)
	}
	return Code(err)
}

// Parse sets each flag named in env (flag name → variable name) from its
// variable when that is set, then parses args. Usage text gains the
// variable's name.
func Parse(fs *flag.FlagSet, env map[string]string, args []string) error {
	for name, variable := range env {
		f := fs.Lookup(name)
		if f == nil {
			return fmt.Errorf("envflag: no flag %q for %s", name, variable)
		}
		f.Usage += " (env " + variable + ")"
		if v, ok := os.LookupEnv(variable); ok && v != "" {
			if err := fs.Set(name, v); err != nil {
				return &UsageError{Err: fmt.Errorf("%s=%q: %v", variable, v, err)}
			}
		}
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return &UsageError{Err: err, Printed: fs.ErrorHandling() == flag.ContinueOnError}
	}
	return nil
}
