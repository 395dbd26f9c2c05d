// Package envflag lets environment variables set flags: the variable sets
// the value, a flag on the command line overrides it, and a bad value in
// either is an error naming both.
package envflag

import (
	"flag"
	"fmt"
	"os"
)

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
				return fmt.Errorf("%s=%q: %v", variable, v, err)
			}
		}
	}
	return fs.Parse(args)
}
