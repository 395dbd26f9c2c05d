package redisconn

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"reflect"
	"strings"
	"testing"
)

// Every password in these tests holds both fragments, so that a leak of
// either half is caught.
const (
	secretA = "S3cr3t"
	secretB = "Xyz9"
)

func assertNoSecret(t *testing.T, what, s string) {
	t.Helper()
	if strings.Contains(s, secretA) || strings.Contains(s, secretB) {
		t.Errorf("%s leaks the password: %s", what, s)
	}
}

func TestParseURL(t *testing.T) {
	sp := func(k Kind, addrs ...string) Spec { return Spec{kind: k, Addrs: addrs} }
	with := func(s Spec, f func(*Spec)) Spec { f(&s); return s }
	cases := []struct {
		raw    string
		want   Spec
		string string // want.String()
	}{
		{"127.0.0.1:6379", sp(Standalone, "127.0.0.1:6379"), "redis://127.0.0.1:6379"},
		{" localhost:6380 ", sp(Standalone, "localhost:6380"), "redis://localhost:6380"},
		{"[::1]:6379", sp(Standalone, "[::1]:6379"), "redis://[::1]:6379"},
		{"redis://localhost", sp(Standalone, "localhost:6379"), "redis://localhost:6379"},
		{"REDIS://cache.internal:7000/", sp(Standalone, "cache.internal:7000"), "redis://cache.internal:7000"},
		{"redis://[::1]/1", with(sp(Standalone, "[::1]:6379"), func(s *Spec) { s.DB = 1 }), "redis://[::1]:6379/1"},
		{"redis://user:S3cr3tXyz9@host:6380/2",
			with(sp(Standalone, "host:6380"), func(s *Spec) { s.Username, s.Password, s.DB = "user", "S3cr3tXyz9", 2 }),
			"redis://user:xxxxx@host:6380/2"},
		{"redis://:S3cr3tXyz9@host",
			with(sp(Standalone, "host:6379"), func(s *Spec) { s.Password = "S3cr3tXyz9" }),
			"redis://:xxxxx@host:6379"},
		{"redis://alice@host:1",
			with(sp(Standalone, "host:1"), func(s *Spec) { s.Username = "alice" }),
			"redis://alice@host:1"},
		{"redis://u:S3cr3t%40%2F%3F%25Xyz9@host:1",
			with(sp(Standalone, "host:1"), func(s *Spec) { s.Username, s.Password = "u", "S3cr3t@/?%Xyz9" }),
			"redis://u:xxxxx@host:1"},
		{"redis://u:S3cr3t@Xyz9@host:1", // an unencoded '@' in the password is tolerated
			with(sp(Standalone, "host:1"), func(s *Spec) { s.Username, s.Password = "u", "S3cr3t@Xyz9" }),
			"redis://u:xxxxx@host:1"},
		{"rediss://:S3cr3tXyz9@redis.example.com:6380?insecure_skip_verify=true",
			with(sp(Standalone, "redis.example.com:6380"), func(s *Spec) {
				s.Password, s.TLS, s.InsecureSkipVerify = "S3cr3tXyz9", true, true
			}),
			"rediss://:xxxxx@redis.example.com:6380?insecure_skip_verify=true"},
		{"rediss://redis.example.com", with(sp(Standalone, "redis.example.com:6379"), func(s *Spec) { s.TLS = true }),
			"rediss://redis.example.com:6379"},
		{"redis-sentinel://h1:26379,h2,10.0.0.3:26381/mymaster",
			with(sp(Sentinel, "h1:26379", "h2:26379", "10.0.0.3:26381"), func(s *Spec) { s.MasterName = "mymaster" }),
			"redis-sentinel://h1:26379,h2:26379,10.0.0.3:26381/mymaster"},
		{"redis-sentinel://app:S3cr3tXyz9@h1:5000,h2:5001/cache-1?db=3&sentinel_password=S3cr3tXyz9",
			with(sp(Sentinel, "h1:5000", "h2:5001"), func(s *Spec) {
				s.MasterName, s.Username, s.Password, s.DB, s.SentinelPassword = "cache-1", "app", "S3cr3tXyz9", 3, "S3cr3tXyz9"
			}),
			"redis-sentinel://app:xxxxx@h1:5000,h2:5001/cache-1?db=3&sentinel_password=xxxxx"},
		{"redis-sentinel://h:1/m?sentinel_username=sen&tls=true&insecure_skip_verify=true",
			with(sp(Sentinel, "h:1"), func(s *Spec) {
				s.MasterName, s.SentinelUsername, s.TLS, s.InsecureSkipVerify = "m", "sen", true, true
			}),
			"redis-sentinel://h:1/m?tls=true&insecure_skip_verify=true&sentinel_username=sen"},
		{"redis-cluster://h1:7000,h2:7001,h3:7002",
			sp(Cluster, "h1:7000", "h2:7001", "h3:7002"),
			"redis-cluster://h1:7000,h2:7001,h3:7002"},
		{"redis-cluster://u:S3cr3tXyz9@h1:7000, h2:7001/?tls=true",
			with(sp(Cluster, "h1:7000", "h2:7001"), func(s *Spec) { s.Username, s.Password, s.TLS = "u", "S3cr3tXyz9", true }),
			"redis-cluster://u:xxxxx@h1:7000,h2:7001?tls=true"},
	}
	for _, c := range cases {
		t.Run(c.raw, func(t *testing.T) {
			got, err := ParseURL(c.raw)
			if err != nil {
				t.Fatalf("ParseURL: %v", err)
			}
			if !reflect.DeepEqual(got, c.want) {
				t.Errorf("ParseURL = %#v\n%+v\nwant %+v", got, fields(got), fields(c.want))
			}
			if got.Kind() != c.want.kind {
				t.Errorf("Kind = %s, want %s", got.Kind(), c.want.kind)
			}
			if s := got.String(); s != c.string {
				t.Errorf("String = %s, want %s", s, c.string)
			}
			assertNoSecret(t, "String", got.String())
			// String reads back as the same Spec, but for the passwords.
			back, err := ParseURL(got.String())
			if err != nil {
				t.Fatalf("ParseURL(String()): %v", err)
			}
			if back.Password != "" {
				back.Password = got.Password
			}
			if back.SentinelPassword != "" {
				back.SentinelPassword = got.SentinelPassword
			}
			if !reflect.DeepEqual(back, got) {
				t.Errorf("ParseURL(String()) = %+v, want %+v", fields(back), fields(got))
			}
		})
	}
}

// fields shows a Spec's fields, password included (test output only).
func fields(s Spec) string {
	return fmt.Sprintf("{kind:%s Addrs:%q MasterName:%q Username:%q Password:%q SentinelUsername:%q SentinelPassword:%q DB:%d TLS:%v Insecure:%v}",
		s.kind, s.Addrs, s.MasterName, s.Username, s.Password, s.SentinelUsername, s.SentinelPassword, s.DB, s.TLS, s.InsecureSkipVerify)
}

func TestParseURLErrors(t *testing.T) {
	cases := []struct{ raw, want string }{
		{"", "empty"},
		{"   ", "empty"},
		{"localhost", "want host:port"},
		{"host:", "has no port"},
		{":6379", "empty host"},
		{"u:S3cr3tXyz9@host:1", "needs a URL"},
		{"http://host:1", `unsupported scheme "http"`},
		{"redis+tls://u:S3cr3tXyz9@host:1", `unsupported scheme "redis+tls"`},
		{"redis://", "missing the address"},
		{"redis://:S3cr3tXyz9@", "missing the address"},
		{"redis://:S3cr3tXyz9@:6379", "empty host"},
		{"redis://u:S3cr3tXyz9@host:0", "invalid port"},
		{"redis://u:S3cr3tXyz9@host:65536", "invalid port"},
		{"redis://host:abc", "invalid port"},
		{"redis://ho st:1", "invalid host"},
		{"redis://host:1:2", "not host:port"},
		{"redis://h1:1,h2:2", "takes one address, not 2"},
		{"redis://u:S3cr3tXyz9@host:1/abc", "database number"},
		{"redis://host/-1", "database number"},
		{"redis://host/1/2", "database number"},
		{"redis://u:S3cr3t/Xyz9@host:1", "percent-encode"},
		{"redis://u:S3cr3t?Xyz9@host:1", "percent-encode"},
		{"redis://u:S3cr3t?password=Xyz9@host:1", "percent-encode"},
		{"redis://u:S3cr3t%zzXyz9@host:1", "bad %-escape"},
		{"redis://host?insecure_skip_verify=true", "only for rediss://"},
		{"rediss://:S3cr3tXyz9@host?insecure_skip_verify=maybe", `true or false, not "maybe"`},
		{"redis://:S3cr3tXyz9@host?foo=1", `unknown parameter "foo"`},
		{"redis://:S3cr3tXyz9@host?db=1", `unknown parameter "db"`},
		{"redis-sentinel://h1:26379,h2:26379", "missing the master name"},
		{"redis-sentinel://:S3cr3tXyz9@h1:26379/", "missing the master name"},
		{"redis-sentinel://h1:26379/?db=1", "missing the master name"},
		{"redis-sentinel://h1:26379/a/b", "just the master name"},
		{"redis-sentinel://h1:26379,,h3:26379/m", "address 2 of 3 is empty"},
		{"redis-sentinel://h1:26379,h2:x/m", "address 2 of 2 has an invalid port"},
		{"redis-sentinel://h:1/m?db=x", `db must be a database number, not "x"`},
		{"redis-sentinel://h:1/m?db=x&sentinel_password=S3cr3tXyz9", `db must be a database number, not (not quoted`},
		{"redis-sentinel://h:1/m?sentinel_password=S3cr3tXyz9&db=x", `db must be a database number`},
		{"redis-sentinel://h:1/m?sentinel_password=S3cr3t@Xyz9", "percent-encode"},
		{"redis-sentinel://h:1/m?sentinel_password=S3cr3t&Xyz9", `unknown parameter (not quoted`},
		{"redis-sentinel://h:1/m?db=1&db=2", `"db" is given 2 times`},
		{"redis-sentinel://h:1/m?insecure_skip_verify=true", "needs tls=true"},
		{"redis-cluster://", "missing the address"},
		{"redis-cluster://h1:7000,,h3:7002", "address 2 of 3 is empty"},
		{"redis-cluster://h1:7000/1", "only database 0"},
		{"redis-cluster://h1:7000?db=0", `unknown parameter "db"`},
		{"redis-cluster://h1:7000?tls=yes", "tls must be true or false"},
	}
	for _, c := range cases {
		t.Run(c.raw, func(t *testing.T) {
			_, err := ParseURL(c.raw)
			if err == nil {
				t.Fatalf("ParseURL(%q) succeeded", c.raw)
			}
			msg := err.Error()
			if !strings.Contains(msg, c.want) {
				t.Errorf("error %q does not say %q", msg, c.want)
			}
			if !strings.HasPrefix(msg, "redis URL ") {
				t.Errorf("error %q does not start by naming the URL", msg)
			}
			if !strings.Contains(msg, fmt.Sprintf("%q", Redact(strings.TrimSpace(c.raw)))) {
				t.Errorf("error %q does not name the URL", msg)
			}
			assertNoSecret(t, "error", msg)
		})
	}
	// One message in full, to see what an operator reads.
	_, err := ParseURL("redis-sentinel://app:S3cr3tXyz9@h1:26379,h2:26379?sentinel_password=S3cr3tXyz9")
	want := `redis URL "redis-sentinel://app:xxxxx@h1:26379,h2:26379?sentinel_password=xxxxx": missing the master name: redis-sentinel://host1:26379,host2:26379,host3:26379/<master-name>`
	if err == nil || err.Error() != want {
		t.Errorf("error = %v\nwant    %s", err, want)
	}
}

func TestRedact(t *testing.T) {
	cases := []struct{ raw, want string }{
		{"host:6379", "host:6379"},
		{"redis://host:6379/0", "redis://host:6379/0"},
		{"redis://alice@host", "redis://alice@host"},
		{"redis://alice:S3cr3tXyz9@host:1/2", "redis://alice:xxxxx@host:1/2"},
		{"redis://:S3cr3tXyz9@host", "redis://:xxxxx@host"},
		{"redis://u:S3cr3t@Xyz9@host", "redis://u:xxxxx@host"},
		{"redis://u:S3cr3t/Xyz9@host/1", "redis://u:xxxxx@host/1"},
		{"redis://u:S3cr3t?Xyz9@host", "redis://u:xxxxx@host"},
		{"u:S3cr3tXyz9@host:1", "u:xxxxx@host:1"},
		{"redis-sentinel://h:1/m?sentinel_password=S3cr3tXyz9&db=1", "redis-sentinel://h:1/m?sentinel_password=xxxxx"},
		{"redis-sentinel://h:1/m?db=1&SENTINEL_PASSWORD=S3cr3t&Xyz9", "redis-sentinel://h:1/m?db=1&SENTINEL_PASSWORD=xxxxx"},
		{"redis-sentinel://h:1/m?sentinel_password=S3cr3t@Xyz9", "redis-sentinel://xxxxx"},
		{"redis://u:S3cr3t?password=Xyz9@host:1", "redis://xxxxx"},
		{"redis://u:S3cr3t@host?password=Xyz9", "redis://u:xxxxx@host?password=xxxxx"},
	}
	for _, c := range cases {
		if got := Redact(c.raw); got != c.want {
			t.Errorf("Redact(%q) = %q, want %q", c.raw, got, c.want)
		}
		assertNoSecret(t, "Redact", Redact(c.raw))
	}
}

// A Spec printed or logged any way shows no password.
func TestSpecNeverPrintsPassword(t *testing.T) {
	spec, err := ParseURL("redis-sentinel://u:S3cr3tXyz9@h1:26379/m?sentinel_password=S3cr3tXyz9")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"%v", "%+v", "%#v", "%s", "%q"} {
		assertNoSecret(t, f, fmt.Sprintf(f, spec))
		assertNoSecret(t, f+" of a pointer", fmt.Sprintf(f, &spec))
	}
	js, err := json.Marshal(map[string]any{"redis": spec})
	if err != nil {
		t.Fatal(err)
	}
	assertNoSecret(t, "json", string(js))
	var buf bytes.Buffer
	slog.New(slog.NewJSONHandler(&buf, nil)).Info("start", "redis", spec)
	slog.New(slog.NewTextHandler(&buf, nil)).Info("start", "redis", spec)
	assertNoSecret(t, "slog", buf.String())
	if !strings.Contains(buf.String(), "h1:26379") {
		t.Errorf("slog output does not show the address: %s", buf.String())
	}
}

func TestResolve(t *testing.T) {
	spec, err := Resolve("redis-cluster://h1:7000,h2:7001", "10.0.0.1:6379")
	if err != nil || spec.Kind() != Cluster || spec.Source != EnvURL {
		t.Errorf("REDIS_URL set: %v, %v (source %s)", spec, err, spec.Source)
	}
	spec, err = Resolve("", "10.0.0.1:6380")
	if err != nil || spec.Kind() != Standalone || spec.Addrs[0] != "10.0.0.1:6380" || spec.Source != EnvAddr {
		t.Errorf("only REDIS_ADDR: %v, %v (source %s)", spec, err, spec.Source)
	}
	spec, err = Resolve("", "")
	if err != nil || spec.Addrs[0] != DefaultAddr {
		t.Errorf("neither: %v, %v", spec, err)
	}
	_, err = Resolve("redis://:S3cr3tXyz9@host:0", "")
	if err == nil || !strings.HasPrefix(err.Error(), "REDIS_URL: redis URL") {
		t.Errorf("bad REDIS_URL: %v", err)
	}
	assertNoSecret(t, "Resolve error", fmt.Sprint(err))
	_, err = Resolve("", "localhost")
	if err == nil || !strings.HasPrefix(err.Error(), "REDIS_ADDR: ") {
		t.Errorf("bad REDIS_ADDR: %v", err)
	}
}
