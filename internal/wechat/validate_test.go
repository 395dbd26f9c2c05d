package wechat

import (
	"regexp"
	"testing"
)

// The regexps the byte loops replaced, kept as the oracle: the classes
// must not move by a character.
var classes = []struct {
	extra string
	re    *regexp.Regexp
}{
	{outRequestNoExtra, regexp.MustCompile(`^[A-Za-z0-9_|*-]*$`)},
	{openIDExtra, regexp.MustCompile(`^[A-Za-z0-9_-]*$`)},
	{idExtra, regexp.MustCompile(`^[A-Za-z0-9_-]*$`)},
	{"_.-", regexp.MustCompile(`^[A-Za-z0-9_.-]*$`)}, // tasks.ValidateCampaign's
}

func TestOnlyAlnumOr(t *testing.T) {
	inputs := []string{
		"", "a", "Z", "0", "9", "oUpF8u0000000000199999", "1900000109-0a1b2c3d4e5f",
		"_", "-", "|", "*", ".", "a|b*c_d-e", "spring.2026",
		" ", "a b", "a\tb", "a\n", "é", "用户", "a\x00b", "a/b", "a+b", "a=b", "a:b", "{x}", "'", `"`,
		"@", "[", "`", "{", "/", ":", "\x7f", "\xff",
	}
	for c := 0; c < 256; c++ {
		inputs = append(inputs, string([]byte{byte(c)}), "ab"+string([]byte{byte(c)}))
	}
	for _, cl := range classes {
		for _, in := range inputs {
			if got, want := OnlyAlnumOr(in, cl.extra), cl.re.MatchString(in); got != want {
				t.Errorf("OnlyAlnumOr(%q, %q) = %v, the regexp %s says %v", in, cl.extra, got, cl.re, want)
			}
		}
	}
}

func FuzzOnlyAlnumOr(f *testing.F) {
	f.Add("oUpF8u-_|*.x")
	f.Fuzz(func(t *testing.T, in string) {
		for _, cl := range classes {
			if got, want := OnlyAlnumOr(in, cl.extra), cl.re.MatchString(in); got != want {
				t.Fatalf("OnlyAlnumOr(%q, %q) = %v, the regexp %s says %v", in, cl.extra, got, cl.re, want)
			}
		}
	})
}
