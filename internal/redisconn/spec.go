package redisconn

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// Kind is the shape of a Redis deployment.
type Kind string

const (
	Standalone Kind = "standalone" // one server (redis://, rediss://, host:port)
	Sentinel   Kind = "sentinel"   // a master found through Sentinels (redis-sentinel://)
	Cluster    Kind = "cluster"    // a Redis Cluster (redis-cluster://)
)

// Default ports when an address has none.
const (
	defaultPort         = "6379"
	defaultSentinelPort = "26379"
)

// redacted stands for every password in what this package prints.
const redacted = "xxxxx"

// Spec says how to reach one Redis deployment. ParseURL builds it; a Spec
// written by hand is standalone. Its String, GoString, LogValue and JSON
// forms never contain a password.
type Spec struct {
	kind Kind

	// Addrs are host:port: the server (standalone), the Sentinels
	// (sentinel), or seed nodes (cluster).
	Addrs []string
	// MasterName is the name the Sentinels monitor (sentinel only).
	MasterName string
	// Username and Password authenticate to the data nodes (AUTH); an
	// empty Username means the default user.
	Username string
	Password string
	// SentinelUsername and SentinelPassword authenticate to the Sentinels
	// themselves, which often have no password even when the master has.
	SentinelUsername string
	SentinelPassword string
	// DB is the database number (not for a cluster, which has only 0).
	DB int
	// TLS: connect with TLS (rediss://, or tls=true). The server name is
	// taken from each address, and the system's roots verify it unless
	// InsecureSkipVerify (for tests only).
	TLS                bool
	InsecureSkipVerify bool
	// Source names where the Spec came from, for error messages: the
	// variable or flag ("REDIS_URL" when empty).
	Source string
}

// Kind says which deployment the Spec describes.
func (s Spec) Kind() Kind {
	if s.kind == "" {
		return Standalone
	}
	return s.kind
}

func (s Spec) source() string {
	if s.Source == "" {
		return EnvURL
	}
	return s.Source
}

// String is the Spec as a URL that ParseURL accepts, with every password
// replaced by xxxxx.
func (s Spec) String() string {
	var b strings.Builder
	q := url.Values{}
	switch s.Kind() {
	case Sentinel:
		b.WriteString("redis-sentinel://")
	case Cluster:
		b.WriteString("redis-cluster://")
	default:
		if s.TLS {
			b.WriteString("rediss://")
		} else {
			b.WriteString("redis://")
		}
	}
	if s.Username != "" || s.Password != "" {
		var u *url.Userinfo
		if s.Password != "" {
			u = url.UserPassword(s.Username, redacted)
		} else {
			u = url.User(s.Username)
		}
		b.WriteString(u.String())
		b.WriteByte('@')
	}
	b.WriteString(strings.Join(s.Addrs, ","))
	var tail []string // query parameters in a fixed order
	switch s.Kind() {
	case Sentinel:
		b.WriteString("/" + url.PathEscape(s.MasterName))
		if s.DB != 0 {
			tail = append(tail, "db="+strconv.Itoa(s.DB))
		}
		if s.TLS {
			tail = append(tail, "tls=true")
		}
	case Cluster:
		if s.TLS {
			tail = append(tail, "tls=true")
		}
	default:
		if s.DB != 0 {
			b.WriteString("/" + strconv.Itoa(s.DB))
		}
	}
	if s.InsecureSkipVerify {
		tail = append(tail, "insecure_skip_verify=true")
	}
	if s.SentinelUsername != "" {
		q.Set("sentinel_username", s.SentinelUsername)
		tail = append(tail, q.Encode())
	}
	if s.SentinelPassword != "" {
		tail = append(tail, "sentinel_password="+redacted)
	}
	if len(tail) > 0 {
		b.WriteString("?" + strings.Join(tail, "&"))
	}
	return b.String()
}

// GoString keeps %#v from printing the password.
func (s Spec) GoString() string { return "redisconn.Spec(" + strconv.Quote(s.String()) + ")" }

// LogValue keeps log/slog from printing the password.
func (s Spec) LogValue() slog.Value { return slog.StringValue(s.String()) }

// MarshalJSON keeps encoding/json (and JSON log handlers) from printing
// the password.
func (s Spec) MarshalJSON() ([]byte, error) { return json.Marshal(s.String()) }

// ParseURL reads the configuration of a Redis deployment:
//
//	host:port                                  standalone, as REDIS_ADDR has always been
//	redis://[user:password@]host[:port][/db]   standalone
//	rediss://[user:password@]host[:port][/db][?insecure_skip_verify=true]
//	                                           standalone over TLS
//	redis-sentinel://[user:password@]host1:26379,host2:26379,host3:26379/master-name
//	    [?db=N&sentinel_username=…&sentinel_password=…&tls=true&insecure_skip_verify=true]
//	redis-cluster://[user:password@]host1:7000,host2:7001,host3:7002
//	    [?tls=true&insecure_skip_verify=true]
//
// The user and password are those of the data nodes (for Sentinel, of the
// master and replicas; the Sentinels' own are sentinel_username and
// sentinel_password). A password goes after a colon (redis://:secret@host
// when there is no user name: a lone redis://name@host is a user name).
// Percent-encode '/', '?' and '%' in a user name or password ("%2F",
// "%3F", "%25"), and '@' in a parameter ("%40"). Ports default to 6379,
// and to 26379 for Sentinels.
//
// Errors name the URL with its passwords replaced by xxxxx, and say what is
// wrong; they never quote a part that could hold a password.
func ParseURL(raw string) (Spec, error) {
	raw = strings.TrimSpace(raw)
	fail := func(format string, args ...any) (Spec, error) {
		return Spec{}, fmt.Errorf("redis URL %q: %s", Redact(raw), fmt.Sprintf(format, args...))
	}
	if raw == "" {
		return fail("empty: want host:port or redis://, rediss://, redis-sentinel:// or redis-cluster://")
	}
	schemeEnd := strings.Index(raw, "://")
	if schemeEnd < 0 {
		return parseBare(raw, fail)
	}
	scheme := strings.ToLower(raw[:schemeEnd])
	var spec Spec
	switch scheme {
	case "redis":
		spec.kind = Standalone
	case "rediss":
		spec.kind, spec.TLS = Standalone, true
	case "redis-sentinel":
		spec.kind = Sentinel
	case "redis-cluster":
		spec.kind = Cluster
	default:
		return fail("unsupported scheme %q: want redis, rediss, redis-sentinel or redis-cluster", scheme)
	}
	rest := raw[schemeEnd+3:]

	// The authority ends at the first '/' or '?'. Its user info ends at its
	// last '@'; an '@' further on means the user info held a '/' or '?'.
	authEnd := strings.IndexAny(rest, "/?")
	if authEnd < 0 {
		authEnd = len(rest)
	}
	authority, tail := rest[:authEnd], rest[authEnd:]
	if strings.Contains(tail, "@") {
		// The user info held a '/' or '?', or a parameter an '@': where a
		// password ends is unclear, so nothing after the address is quoted.
		return fail("an '@' after the address: percent-encode '/', '?' and '@' in a user name or password, and '@' in a parameter (%%2F, %%3F, %%40)")
	}
	if at := strings.LastIndex(authority, "@"); at >= 0 {
		userinfo := authority[:at]
		authority = authority[at+1:]
		user, pass, hasPass := strings.Cut(userinfo, ":")
		var err error
		if spec.Username, err = url.PathUnescape(user); err != nil {
			return fail("the user name has a bad %%-escape")
		}
		if hasPass {
			if spec.Password, err = url.PathUnescape(pass); err != nil {
				return fail("the password has a bad %%-escape")
			}
		}
	}
	port := defaultPort
	if spec.kind == Sentinel {
		port = defaultSentinelPort
	}
	addrs, msg := parseAddrs(authority, port)
	if msg != "" {
		return fail("%s", msg)
	}
	spec.Addrs = addrs

	path, rawQuery, _ := strings.Cut(tail, "?")
	query, err := url.ParseQuery(rawQuery)
	if err != nil {
		return fail("the query (after '?') is malformed")
	}
	// A password parameter may hold an unencoded '&', making what follows
	// look like other parameters: then no name or value is quoted.
	quote := func(v string) string { return strconv.Quote(v) }
	if secretParam.MatchString("?" + rawQuery) {
		quote = func(string) string {
			return "(not quoted: the query holds a password; percent-encode '&' in it as %26)"
		}
	}
	param := func(name string) (string, bool) {
		v, ok := query[name]
		delete(query, name)
		if !ok {
			return "", false
		}
		return v[len(v)-1], true
	}
	for name, vs := range query {
		if len(vs) > 1 {
			return fail("parameter %s is given %d times", quote(name), len(vs))
		}
	}
	boolParam := func(name string) (bool, string) {
		v, ok := param(name)
		if !ok {
			return false, ""
		}
		b, err := strconv.ParseBool(v)
		if err != nil {
			return false, fmt.Sprintf("%s must be true or false, not %s", name, quote(v))
		}
		return b, ""
	}

	switch spec.kind {
	case Standalone:
		if len(spec.Addrs) > 1 {
			return fail("%s:// takes one address, not %d; for several use redis-sentinel:// or redis-cluster://", scheme, len(spec.Addrs))
		}
		if db := strings.TrimPrefix(path, "/"); db != "" {
			n, err := strconv.Atoi(db)
			if err != nil || n < 0 || strings.Contains(db, "/") {
				return fail("the path must be a database number, like /0")
			}
			spec.DB = n
		}
	case Sentinel:
		name := strings.TrimPrefix(path, "/")
		if name == "" {
			return fail("missing the master name: redis-sentinel://host1:26379,host2:26379,host3:26379/<master-name>")
		}
		if strings.Contains(name, "/") {
			return fail("the path must be just the master name, like /mymaster")
		}
		if spec.MasterName, err = url.PathUnescape(name); err != nil {
			return fail("the master name has a bad %%-escape")
		}
		if v, ok := param("db"); ok {
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				return fail("db must be a database number, not %s", quote(v))
			}
			spec.DB = n
		}
		spec.SentinelUsername, _ = param("sentinel_username")
		spec.SentinelPassword, _ = param("sentinel_password")
	case Cluster:
		if p := strings.TrimPrefix(path, "/"); p != "" {
			return fail("a cluster has no database number or other path (only database 0 exists)")
		}
	}
	if spec.kind != Standalone {
		if spec.TLS, msg = boolParam("tls"); msg != "" {
			return fail("%s", msg)
		}
	}
	if spec.InsecureSkipVerify, msg = boolParam("insecure_skip_verify"); msg != "" {
		return fail("%s", msg)
	}
	if spec.InsecureSkipVerify && !spec.TLS {
		if spec.kind == Standalone {
			return fail("insecure_skip_verify is only for rediss://")
		}
		return fail("insecure_skip_verify needs tls=true")
	}
	if len(query) > 0 {
		names := make([]string, 0, len(query))
		for name := range query {
			names = append(names, name)
		}
		sort.Strings(names)
		return fail("unknown parameter %s (known: %s)", quote(names[0]), knownParams(spec.kind))
	}
	return spec, nil
}

func knownParams(k Kind) string {
	switch k {
	case Sentinel:
		return "db, sentinel_username, sentinel_password, tls, insecure_skip_verify"
	case Cluster:
		return "tls, insecure_skip_verify"
	}
	return "insecure_skip_verify, with rediss://; TLS is rediss://, the database the path /N"
}

// parseBare reads host:port, the form of REDIS_ADDR.
func parseBare(raw string, fail func(string, ...any) (Spec, error)) (Spec, error) {
	if strings.ContainsAny(raw, "@/?") {
		return fail("not host:port; a user name, password or database needs a URL: redis://[user:password@]host:port[/db]")
	}
	if _, _, err := net.SplitHostPort(raw); err != nil {
		return fail("want host:port or a URL (redis://, rediss://, redis-sentinel://, redis-cluster://)")
	}
	addrs, msg := parseAddrs(raw, "")
	if msg != "" {
		return fail("%s", msg)
	}
	return Spec{kind: Standalone, Addrs: addrs}, nil
}

// parseAddrs splits a comma-separated list of host[:port], giving each the
// default port when it has none ("" requires one). The message, when not
// empty, says what is wrong.
func parseAddrs(list, port string) ([]string, string) {
	if list == "" {
		return nil, "missing the address (host:port)"
	}
	parts := strings.Split(list, ",")
	addrs := make([]string, 0, len(parts))
	for i, p := range parts {
		which := "the address"
		if len(parts) > 1 {
			which = fmt.Sprintf("address %d of %d", i+1, len(parts))
		}
		p = strings.TrimSpace(p)
		if p == "" {
			return nil, which + " is empty"
		}
		host, pt := p, port
		if strings.HasPrefix(p, "[") || strings.Count(p, ":") == 1 {
			h, ptx, err := net.SplitHostPort(p)
			if err != nil {
				if strings.HasPrefix(p, "[") && strings.HasSuffix(p, "]") { // [::1] without a port
					h, ptx, err = strings.TrimSuffix(strings.TrimPrefix(p, "["), "]"), port, nil
				}
				if err != nil {
					return nil, which + " is not host:port"
				}
			}
			host, pt = h, ptx
		} else if strings.Contains(p, ":") {
			return nil, which + " is not host:port (write an IPv6 address in brackets: [::1]:6379)"
		}
		if host == "" {
			return nil, which + " has an empty host"
		}
		if !validHost(host) {
			return nil, which + " has an invalid host"
		}
		if pt == "" {
			return nil, which + " has no port"
		}
		n, err := strconv.Atoi(pt)
		if err != nil || n < 1 || n > 65535 {
			return nil, which + " has an invalid port (want 1 to 65535)"
		}
		addrs = append(addrs, net.JoinHostPort(host, pt))
	}
	return addrs, ""
}

func validHost(h string) bool {
	if net.ParseIP(h) != nil {
		return true
	}
	for _, r := range h {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '-' || r == '_') {
			return false
		}
	}
	return true
}

// secretParam finds a query parameter that holds a password.
var secretParam = regexp.MustCompile(`(?i)[?&](?:sentinel_)?password=`)

// Redact returns a Redis URL or address with every password replaced by
// xxxxx, whether or not it parses: the user info up to the last '@'
// (keeping a user name before its ':'), and a password parameter with all
// that follows it (a password may hold an unencoded '&'). When it cannot
// tell where a password ends it hides everything after the scheme: it may
// hide more than the password, never less.
func Redact(raw string) string {
	start := 0
	if i := strings.Index(raw, "://"); i >= 0 {
		start = i + 3
	}
	body := raw[start:]
	head, tail := body, ""
	if m := secretParam.FindStringIndex(body); m != nil {
		head, tail = body[:m[0]], body[m[0]:m[1]]+redacted
		if !strings.Contains(head, "@") && strings.Contains(body[m[1]:], "@") {
			// Either a password parameter holding an '@', or user info
			// holding "?password=": hide it all.
			return raw[:start] + redacted
		}
	}
	if at := strings.LastIndex(head, "@"); at >= 0 {
		if user, _, hasPass := strings.Cut(head[:at], ":"); hasPass {
			head = user + ":" + redacted + head[at:]
		}
	}
	return raw[:start] + head + tail
}
