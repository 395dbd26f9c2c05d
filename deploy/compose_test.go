// Package deploy holds the deployment's checks: docker-compose.yml, the
// Dockerfile and deploy/prometheus.yml are parsed and compared with the
// code, so that a renamed variable, a moved port or a lost Redis setting
// fails `go test ./...`. Nothing here needs Docker. See docs/deploy.md.
package deploy

import (
	"errors"
	"fmt"
	"go/scanner"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// root is the repository's root, seen from this package's directory (where
// go test runs).
const root = ".."

// compose is the part of the Compose spec the checks read. Fields that
// take several forms (a string or a list, a map or a list) are left as any.
type compose struct {
	Version  any                 `yaml:"version"`
	Services map[string]*service `yaml:"services"`
	Volumes  map[string]any      `yaml:"volumes"`
	Configs  map[string]struct {
		Content     *string `yaml:"content"`
		File        string  `yaml:"file"`
		Environment string  `yaml:"environment"`
	} `yaml:"configs"`
	Secrets map[string]struct {
		File        string `yaml:"file"`
		Environment string `yaml:"environment"`
	} `yaml:"secrets"`
}

type service struct {
	Image           string `yaml:"image"`
	Build           any    `yaml:"build"`
	PullPolicy      string `yaml:"pull_policy"`
	ContainerName   string `yaml:"container_name"`
	Entrypoint      any    `yaml:"entrypoint"`
	Command         any    `yaml:"command"`
	Environment     any    `yaml:"environment"`
	EnvFile         any    `yaml:"env_file"`
	Ports           []any  `yaml:"ports"`
	Expose          []any  `yaml:"expose"`
	Volumes         []any  `yaml:"volumes"`
	Profiles        []string
	DependsOn       any    `yaml:"depends_on"`
	StopGracePeriod string `yaml:"stop_grace_period"`
	Healthcheck     *struct {
		Test any `yaml:"test"`
	} `yaml:"healthcheck"`
	Configs []any `yaml:"configs"`
	Secrets []any `yaml:"secrets"`
}

func loadCompose(t *testing.T) *compose {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, "docker-compose.yml"))
	if err != nil {
		t.Fatal(err)
	}
	var c compose
	if err := yaml.Unmarshal(b, &c); err != nil {
		t.Fatalf("docker-compose.yml: %v", err)
	}
	if len(c.Services) == 0 {
		t.Fatal("docker-compose.yml: no services")
	}
	return &c
}

func (c *compose) service(t *testing.T, name string) *service {
	t.Helper()
	s := c.Services[name]
	if s == nil {
		t.Fatalf("docker-compose.yml: no service %q", name)
	}
	return s
}

// ours reports whether s runs the project's image: it builds it, or uses
// the image another service builds.
func (c *compose) ours(s *service) bool {
	if s.Build != nil {
		return true
	}
	for _, o := range c.Services {
		if o.Build != nil && o.Image != "" && o.Image == s.Image {
			return true
		}
	}
	return false
}

// names returns the service names, sorted, for stable messages.
func (c *compose) names() []string {
	var out []string
	for n := range c.Services {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// interpolate applies Compose's variable substitution as if no variable
// were set: ${X:-d} and ${X-d} give d, anything else nothing; $$ is $.
func interpolate(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '$' || i+1 == len(s) {
			b.WriteByte(s[i])
			continue
		}
		switch next := s[i+1]; {
		case next == '$':
			b.WriteByte('$')
			i++
		case next == '{':
			end := strings.IndexByte(s[i:], '}')
			if end < 0 {
				b.WriteString(s[i:])
				return b.String()
			}
			expr := s[i+2 : i+end]
			if _, def, ok := strings.Cut(expr, ":-"); ok {
				b.WriteString(def)
			} else if _, def, ok := strings.Cut(expr, "-"); ok {
				b.WriteString(def)
			}
			i += end
		default:
			j := i + 1
			for j < len(s) && (s[j] == '_' || s[j] >= 'A' && s[j] <= 'Z' || s[j] >= 'a' && s[j] <= 'z' || s[j] >= '0' && s[j] <= '9') {
				j++
			}
			i = j - 1
		}
	}
	return b.String()
}

// words turns a string-or-list field (command, entrypoint, healthcheck
// test) into its words.
func words(v any) []string {
	switch v := v.(type) {
	case nil:
		return nil
	case string:
		return strings.Fields(v)
	case []any:
		out := make([]string, len(v))
		for i, w := range v {
			out[i] = fmt.Sprint(w)
		}
		return out
	default:
		return []string{fmt.Sprint(v)}
	}
}

// env returns the variables a service sets, raw (not interpolated); a name
// given without a value maps to "".
func (s *service) env() map[string]string {
	out := map[string]string{}
	switch e := s.Environment.(type) {
	case map[string]any:
		for k, v := range e {
			if v == nil {
				out[k] = ""
			} else {
				out[k] = fmt.Sprint(v)
			}
		}
	case []any:
		for _, kv := range e {
			k, v, _ := strings.Cut(fmt.Sprint(kv), "=")
			out[k] = v
		}
	}
	return out
}

// flag returns the value of --name=v or --name v in args.
func flagValue(args []string, name string) (string, bool) {
	for i, a := range args {
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v, true
		}
		if a == name && i+1 < len(args) {
			return args[i+1], true
		}
	}
	return "", false
}

// portMap is one entry of ports or expose.
type portMap struct {
	hostIP    string
	published string // "" when Docker picks the host port (or for expose)
	target    string
	raw       string
}

func parsePort(v any) (portMap, error) {
	if m, ok := v.(map[string]any); ok { // long syntax
		p := portMap{target: fmt.Sprint(m["target"]), raw: fmt.Sprint(m)}
		if pub, ok := m["published"]; ok && pub != nil {
			p.published = interpolate(fmt.Sprint(pub))
		}
		if ip, ok := m["host_ip"]; ok && ip != nil {
			p.hostIP = fmt.Sprint(ip)
		}
		return p, nil
	}
	raw := fmt.Sprint(v)
	s, _, _ := strings.Cut(interpolate(raw), "/") // drop /tcp, /udp
	parts := strings.Split(s, ":")
	p := portMap{raw: raw, target: parts[len(parts)-1]}
	switch len(parts) {
	case 1:
	case 2:
		p.published = parts[0]
	case 3:
		p.hostIP, p.published = parts[0], parts[1]
	default:
		return p, fmt.Errorf("cannot read port mapping %q", raw)
	}
	return p, nil
}

// mount is one entry of volumes.
type mount struct {
	source, target string
	readOnly       bool
}

func parseMount(v any) mount {
	if m, ok := v.(map[string]any); ok {
		ro, _ := m["read_only"].(bool)
		return mount{source: fmt.Sprint(m["source"]), target: fmt.Sprint(m["target"]), readOnly: ro}
	}
	parts := strings.Split(fmt.Sprint(v), ":")
	mt := mount{target: parts[0]}
	if len(parts) >= 2 {
		mt.source, mt.target = parts[0], parts[1]
	}
	if len(parts) >= 3 {
		mt.readOnly = slices.Contains(strings.Split(parts[2], ","), "ro")
	}
	return mt
}

func (s *service) mountAt(target string) (mount, bool) {
	for _, v := range s.Volumes {
		if m := parseMount(v); m.target == target {
			return m, true
		}
	}
	return mount{}, false
}

// program is what a service of the project's image runs: the last word of
// a shell wrapper's entrypoint (sh -c script name program), else the first
// word of the entrypoint, else of the command, else the image's CMD.
func (s *service) program() string {
	ep := words(s.Entrypoint)
	if len(ep) >= 3 && isShell(ep[0]) && ep[1] == "-c" {
		if len(ep) >= 5 {
			return ep[4]
		}
		return ""
	}
	if len(ep) > 0 {
		return filepath.Base(ep[0])
	}
	if cmd := words(s.Command); len(cmd) > 0 {
		return filepath.Base(cmd[0])
	}
	return "worker" // the Dockerfile's CMD
}

func isShell(w string) bool {
	switch filepath.Base(w) {
	case "sh", "bash", "dash":
		return true
	}
	return false
}

// args are the words of the service's command line that the compose file
// gives, for finding flags in: the entrypoint, unless it is a shell
// wrapper, and the command.
func (s *service) args() []string {
	ep := words(s.Entrypoint)
	if len(ep) >= 3 && isShell(ep[0]) && ep[1] == "-c" {
		ep = nil
	}
	return append(ep, words(s.Command)...)
}

func TestComposeSpecFile(t *testing.T) {
	c := loadCompose(t)
	if c.Version != nil {
		t.Errorf("docker-compose.yml: drop the top-level version key (%v): the Compose spec has none and Compose warns about it", c.Version)
	}
	for _, name := range []string{"redis", "sandbox", "worker", "monitor", "prometheus", "enqueuer"} {
		if c.Services[name] == nil {
			t.Errorf("docker-compose.yml: service %q is missing", name)
		}
	}
	for name, profile := range map[string]string{"prometheus": "monitoring", "enqueuer": "tools"} {
		if s := c.Services[name]; s != nil && !slices.Contains(s.Profiles, profile) {
			t.Errorf("service %q: want it under the profile %q (optional), has profiles %v", name, profile, s.Profiles)
		}
	}
	for _, name := range c.names() {
		s := c.Services[name]
		if c.ours(s) && s.EnvFile != nil {
			t.Errorf("service %q: env_file hides its variables from these checks; set them under environment", name)
		}
	}
}

// The project's image is built by one service and used by the others under
// the same tag. Were several services to carry build: with one image name,
// compose would build one image per service under that tag (the others
// left dangling), and a later `docker compose run --rm enqueuer …` would
// build the tag anew and recreate the running services whose image it
// replaced: seen on the first real run.
func TestImageBuiltOnce(t *testing.T) {
	c := loadCompose(t)
	var builders []string
	for _, name := range c.names() {
		if c.Services[name].Build != nil {
			builders = append(builders, name)
		}
	}
	if len(builders) != 1 {
		t.Fatalf("docker-compose.yml: services %v have build:; want exactly one service to build the project's image and the others to use it by its image name", builders)
	}
	b := c.Services[builders[0]]
	if b.Image == "" {
		t.Fatalf("service %q builds without an image: name; the other services could not name what it builds", builders[0])
	}
	users := 0
	for _, name := range c.names() {
		s := c.Services[name]
		if name == builders[0] || s.Image != b.Image {
			continue
		}
		users++
		if s.PullPolicy != "never" {
			t.Errorf("service %q uses %s, built by %q, with pull_policy %q; want never: the image exists only here, and a pull would ask a registry for it", name, s.Image, builders[0], s.PullPolicy)
		}
	}
	for _, name := range []string{"sandbox", "worker", "monitor", "enqueuer"} {
		if s := c.Services[name]; s != nil && s.Image != b.Image {
			t.Errorf("service %q runs image %q; want %q, the one service %q builds", name, s.Image, b.Image, builders[0])
		}
	}
	if users == 0 {
		t.Errorf("docker-compose.yml: no other service uses %s, the image %q builds", b.Image, builders[0])
	}
}

func TestRedisKeepsEverything(t *testing.T) {
	c := loadCompose(t)
	s := c.service(t, "redis")
	args := words(s.Command)
	for _, want := range [][2]string{{"--appendonly", "yes"}, {"--maxmemory-policy", "noeviction"}} {
		if v, ok := flagValue(args, want[0]); !ok || v != want[1] {
			t.Errorf("service redis: command %q must have %s %s (README, \"Redis in production\"); got %q", args, want[0], want[1], v)
		}
	}
	if v, _ := flagValue(args, "--appendfsync"); v != "everysec" && v != "always" {
		t.Errorf("service redis: command %q must have --appendfsync everysec or always; got %q", args, v)
	}
	if m, ok := s.mountAt("/data"); !ok || c.Volumes == nil || !hasKey(c.Volumes, m.source) {
		t.Errorf("service redis: /data must be a named volume (declared under volumes:), so the AOF outlives the container; got %+v", m)
	}
	if s.Healthcheck == nil || !strings.Contains(strings.Join(words(s.Healthcheck.Test), " "), "redis-cli ping") {
		t.Errorf("service redis: want a healthcheck with redis-cli ping, for the services that depend on it being healthy")
	}
}

func hasKey(m map[string]any, k string) bool {
	_, ok := m[k]
	return ok
}

// dependsOn returns the services s depends on and their conditions.
func (s *service) dependsOn() map[string]string {
	out := map[string]string{}
	switch d := s.DependsOn.(type) {
	case []any:
		for _, n := range d {
			out[fmt.Sprint(n)] = "service_started"
		}
	case map[string]any:
		for n, v := range d {
			cond := "service_started"
			if m, ok := v.(map[string]any); ok && m["condition"] != nil {
				cond = fmt.Sprint(m["condition"])
			}
			out[n] = cond
		}
	}
	return out
}

func TestWorkerScalesOutAndStopsGracefully(t *testing.T) {
	c := loadCompose(t)
	s := c.service(t, "worker")
	if s.ContainerName != "" {
		t.Errorf("service worker: container_name %q makes `docker compose up --scale worker=3` fail; remove it", s.ContainerName)
	}
	for _, p := range s.Ports {
		pm, err := parsePort(p)
		if err != nil || pm.published != "" {
			t.Errorf("service worker: port mapping %q binds a host port, so a second replica cannot start; use expose", pm.raw)
		}
	}
	// The worker's ShutdownTimeout is the call timeout plus 10s
	// (dispatch.Handler.ShutdownTimeout); Docker must wait longer.
	callTimeout := 15 * time.Second
	if v := interpolate(s.env()["WORKER_CALL_TIMEOUT"]); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("service worker: WORKER_CALL_TIMEOUT=%q: %v", v, err)
		}
		callTimeout = d
	}
	want := max(30*time.Second, callTimeout+10*time.Second)
	grace, err := time.ParseDuration(interpolate(s.StopGracePeriod))
	switch {
	case s.StopGracePeriod == "":
		t.Errorf("service worker: no stop_grace_period: Docker kills it 10s after SIGTERM, cutting calls in flight; want at least %s", want)
	case err != nil:
		t.Errorf("service worker: stop_grace_period %q: %v", s.StopGracePeriod, err)
	case grace < want:
		t.Errorf("service worker: stop_grace_period %s is shorter than %s (call timeout %s + 10s, at least 30s): calls in flight would be killed", grace, want, callTimeout)
	}
	deps := s.dependsOn()
	if deps["redis"] != "service_healthy" {
		t.Errorf("service worker: want depends_on redis with condition service_healthy, got %q", deps["redis"])
	}
	if _, ok := deps["sandbox"]; !ok {
		t.Errorf("service worker: want depends_on sandbox (it reads the sandbox's keys and ids)")
	}
}

// envPattern is the shape of the names the project's programs read.
var envPattern = regexp.MustCompile(`^(WECHATPAY|REDIS|WORKER|MONITOR|LOG|QUEUE|SANDBOX)_[A-Z0-9_]+$`)

// namesInCode returns every string literal of envPattern's shape in the
// non-test Go files under cmd/ and internal/, with a file that has it.
func namesInCode(t *testing.T) map[string]string {
	t.Helper()
	names := map[string]string{}
	for _, dir := range []string{"cmd", "internal"} {
		err := filepath.WalkDir(filepath.Join(root, dir), func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() {
				if d.Name() == "testdata" {
					return filepath.SkipDir
				}
				return nil
			}
			if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
				return nil
			}
			src, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			fset := token.NewFileSet()
			var sc scanner.Scanner
			sc.Init(fset.AddFile(path, -1, len(src)), src, nil, 0)
			for {
				_, tok, lit := sc.Scan()
				if tok == token.EOF {
					break
				}
				if tok != token.STRING {
					continue
				}
				if s, err := strconv.Unquote(lit); err == nil && envPattern.MatchString(s) {
					if _, seen := names[s]; !seen {
						rel, _ := filepath.Rel(root, path)
						names[s] = rel
					}
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if len(names) == 0 {
		t.Fatal("found no variable names in cmd/ and internal/: is the scan broken?")
	}
	return names
}

// TestEnvironmentNamesAreRead: a variable the programs never read is a
// setting silently lost (a typo, a renamed variable). Every variable set on
// a service of the project's image must be read by the code; on other
// services (redis, prometheus) those of the project's shape must be.
func TestEnvironmentNamesAreRead(t *testing.T) {
	c := loadCompose(t)
	known := namesInCode(t)
	for _, name := range c.names() {
		s := c.Services[name]
		env := s.env()
		vars := make([]string, 0, len(env))
		for v := range env {
			vars = append(vars, v)
		}
		sort.Strings(vars)
		for _, v := range vars {
			if !c.ours(s) && !envPattern.MatchString(v) {
				continue
			}
			if _, ok := known[v]; !ok {
				t.Errorf("service %q sets %s, but no non-test .go file under cmd/ or internal/ has the string literal %q: the program ignores it (a typo, or code not written yet)", name, v, v)
			}
		}
	}
}

// TestProgramsExist: each service of the project's image runs a program
// the image has, one per directory under cmd/ (the Dockerfile builds
// ./cmd/...).
func TestProgramsExist(t *testing.T) {
	c := loadCompose(t)
	for _, name := range c.names() {
		s := c.Services[name]
		if !c.ours(s) {
			continue
		}
		prog := s.program()
		if prog == "" {
			t.Errorf("service %q: its shell entrypoint names no program (want /bin/sh -c <script> <name> <program>)", name)
			continue
		}
		if fi, err := os.Stat(filepath.Join(root, "cmd", prog)); err != nil || !fi.IsDir() {
			t.Errorf("service %q runs %q, but there is no cmd/%s: the image has no such program", name, prog, prog)
		}
		// A shell wrapper must exec the program: otherwise sh is PID 1,
		// SIGTERM never reaches the program and docker kills it.
		if ep := words(s.Entrypoint); len(ep) >= 3 && isShell(ep[0]) && ep[1] == "-c" && !strings.Contains(ep[2], `exec "$$@"`) {
			t.Errorf("service %q: the entrypoint script must end in exec \"$$@\", so that %s gets SIGTERM", name, prog)
		}
	}
}

// listener says where a service's own listen address is set.
type listener struct {
	service string
	env     string // variable holding host:port
	flag    string // or the flag
	def     string // the program's default
	publish string // the port it must publish on the host, "" for none
}

var listeners = []listener{
	{service: "sandbox", flag: "--addr", def: "127.0.0.1:8090", publish: "8090"},
	{service: "monitor", env: "MONITOR_ADDR", flag: "--addr", def: "127.0.0.1:8080", publish: "8080"},
	{service: "worker", env: "WORKER_HTTP_ADDR", flag: "--http-addr", def: "127.0.0.1:9091"},
	{service: "prometheus", flag: "--web.listen-address", def: "0.0.0.0:9090", publish: "9090"},
}

// listenAddr returns the service's listen address and where it came from.
func (l listener) listenAddr(s *service) (addr, from string) {
	if l.flag != "" {
		if v, ok := flagValue(s.args(), l.flag); ok {
			return interpolate(v), l.flag
		}
	}
	if l.env != "" {
		if v, ok := s.env()[l.env]; ok {
			return interpolate(v), l.env
		}
	}
	return l.def, "the default"
}

func TestPortsMatchListenAddresses(t *testing.T) {
	c := loadCompose(t)
	for _, l := range listeners {
		s := c.Services[l.service]
		if s == nil {
			t.Errorf("docker-compose.yml: no service %q", l.service)
			continue
		}
		addr, from := l.listenAddr(s)
		if addr == "" {
			t.Errorf("service %q: no listen address: set %s", l.service, strings.Join(slices.DeleteFunc([]string{l.env, l.flag}, func(s string) bool { return s == "" }), " or "))
			continue
		}
		host, port, err := splitHostPort(addr)
		if err != nil {
			t.Errorf("service %q: listen address %q (%s): %v", l.service, addr, from, err)
			continue
		}
		if host != "" && host != "0.0.0.0" && host != "::" {
			t.Errorf("service %q listens on %s (%s): other containers and the published port cannot reach it; use 0.0.0.0:%s", l.service, addr, from, port)
		}
		published := false
		for _, p := range s.Ports {
			pm, err := parsePort(p)
			if err != nil {
				t.Errorf("service %q: %v", l.service, err)
				continue
			}
			if pm.target != port {
				t.Errorf("service %q publishes container port %s (%q), but listens on %s (%s)", l.service, pm.target, pm.raw, addr, from)
			}
			if pm.published == l.publish {
				published = true
			}
		}
		for _, e := range s.Expose {
			if p := fmt.Sprint(e); p != port {
				t.Errorf("service %q exposes port %s, but listens on %s (%s)", l.service, p, addr, from)
			}
		}
		if l.publish != "" && !published {
			t.Errorf("service %q must publish port %s on the host (ports: \"%s:%s\"), got %v", l.service, l.publish, l.publish, port, s.Ports)
		}
		// The HTTP probe of a healthcheck: bash -c <probe> <name> <port> <path>.
		if s.Healthcheck != nil {
			if w := words(s.Healthcheck.Test); len(w) >= 6 && w[0] == "CMD" && isShell(w[1]) && w[2] == "-c" && w[5] != port {
				t.Errorf("service %q: its healthcheck probes port %s, but it listens on %s (%s)", l.service, w[5], addr, from)
			}
		}
	}
}

func splitHostPort(addr string) (host, port string, err error) {
	i := strings.LastIndexByte(addr, ':')
	if i < 0 {
		return "", "", errors.New("want host:port")
	}
	host, port = strings.Trim(addr[:i], "[]"), addr[i+1:]
	if n, err := strconv.Atoi(port); err != nil || n <= 0 || n > 65535 {
		return "", "", fmt.Errorf("port %q is not a port number", port)
	}
	return host, port, nil
}

func TestMonitorRequiresPassword(t *testing.T) {
	c := loadCompose(t)
	v, ok := c.service(t, "monitor").env()["MONITOR_PASSWORD"]
	if !ok || !regexp.MustCompile(`^\$\{MONITOR_PASSWORD:\?.+\}$`).MatchString(v) {
		t.Errorf("service monitor: MONITOR_PASSWORD must be ${MONITOR_PASSWORD:?message}, so that compose refuses to start without one; got %q", v)
	}
}

// TestSandboxWiring: the services that load the sandbox's sandbox.env
// (through the entrypoint wrapper) see its volume read-only at /sandbox
// and wait for it; those that talk to it reach it by its service name and
// read its keys from that volume.
func TestSandboxWiring(t *testing.T) {
	c := loadCompose(t)
	sb := c.service(t, "sandbox")
	dataDir, ok := flagValue(sb.args(), "--data-dir")
	if !ok {
		t.Fatalf("service sandbox: no --data-dir in %q", sb.args())
	}
	data, ok := sb.mountAt(dataDir)
	if !ok || !hasKey(c.Volumes, data.source) {
		t.Fatalf("service sandbox: its --data-dir %s must be a named volume, shared with the services that need its keys", dataDir)
	}
	addr, _ := listeners[0].listenAddr(sb)
	_, port, _ := splitHostPort(addr)
	wantURL := "http://sandbox:" + port
	envFile := "/sandbox/" + sandbox.EnvFile
	for _, name := range c.names() {
		s := c.Services[name]
		if !c.ours(s) || name == "sandbox" {
			continue
		}
		env := s.env()
		ep := words(s.Entrypoint)
		wrapped := len(ep) >= 3 && strings.Contains(ep[2], envFile)
		base, talks := env[wechat.EnvBaseURL]
		if talks && !wrapped {
			t.Errorf("service %q sets %s but its entrypoint does not load the sandbox's ids from %s", name, wechat.EnvBaseURL, envFile)
		}
		if !wrapped {
			continue
		}
		if m, ok := s.mountAt("/sandbox"); !ok || m.source != data.source || !m.readOnly {
			t.Errorf("service %q: want the sandbox's volume %q mounted read-only at /sandbox, got %+v", name, data.source, m)
		}
		if deps := s.dependsOn(); deps["sandbox"] != "service_healthy" {
			t.Errorf("service %q: want depends_on sandbox with condition service_healthy (%s must exist), got %q", name, envFile, deps["sandbox"])
		}
		if !talks {
			continue
		}
		if base != wantURL {
			t.Errorf("service %q: %s=%q, want %q (the sandbox's service name and port)", name, wechat.EnvBaseURL, base, wantURL)
		}
		for v, file := range map[string]string{wechat.EnvPrivateKey: sandbox.MerchantKeyFile, wechat.EnvPublicKey: sandbox.PublicKeyFile} {
			if want := "/sandbox/" + file; env[v] != want {
				t.Errorf("service %q: %s=%q, want %q (sandbox.env names the paths inside the sandbox's container)", name, v, env[v], want)
			}
		}
	}
	for _, name := range []string{"worker", "enqueuer"} {
		if s := c.Services[name]; s != nil && s.env()[wechat.EnvBaseURL] == "" {
			t.Errorf("service %q: %s is not set: sandbox.env's %s is the sandbox's own loopback address", name, wechat.EnvBaseURL, wechat.EnvBaseURL)
		}
	}
}

func TestPrometheusScrapesEveryWorker(t *testing.T) {
	c := loadCompose(t)
	b, err := os.ReadFile(filepath.Join(root, "deploy", "prometheus.yml"))
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		ScrapeConfigs []struct {
			JobName      string `yaml:"job_name"`
			MetricsPath  string `yaml:"metrics_path"`
			DNSSDConfigs []struct {
				Names []string `yaml:"names"`
				Type  string   `yaml:"type"`
				Port  int      `yaml:"port"`
			} `yaml:"dns_sd_configs"`
			StaticConfigs []struct {
				Targets []string `yaml:"targets"`
			} `yaml:"static_configs"`
			BasicAuth *struct {
				Username     string `yaml:"username"`
				UsernameFile string `yaml:"username_file"`
				PasswordFile string `yaml:"password_file"`
			} `yaml:"basic_auth"`
		} `yaml:"scrape_configs"`
	}
	if err := yaml.Unmarshal(b, &cfg); err != nil {
		t.Fatalf("deploy/prometheus.yml: %v", err)
	}
	prom := c.service(t, "prometheus")
	port := func(service string) string {
		for _, l := range listeners {
			if l.service == service {
				addr, _ := l.listenAddr(c.service(t, service))
				_, p, _ := splitHostPort(addr)
				return p
			}
		}
		t.Fatalf("no listener for %s", service)
		return ""
	}
	if v, ok := flagValue(prom.args(), "--config.file"); !ok {
		t.Errorf("service prometheus: no --config.file")
	} else if m, ok := prom.mountAt(v); !ok || filepath.Clean(m.source) != "deploy/prometheus.yml" {
		t.Errorf("service prometheus: --config.file %s must be ./deploy/prometheus.yml mounted, got %+v", v, m)
	}

	var workers, monitor bool
	for _, sc := range cfg.ScrapeConfigs {
		if sc.MetricsPath != "" && sc.MetricsPath != "/metrics" {
			t.Errorf("deploy/prometheus.yml: job %s scrapes %s, the programs serve /metrics", sc.JobName, sc.MetricsPath)
		}
		for _, d := range sc.DNSSDConfigs {
			if !slices.Contains(d.Names, "worker") {
				continue
			}
			workers = true
			if d.Type != "A" || strconv.Itoa(d.Port) != port("worker") {
				t.Errorf("deploy/prometheus.yml: job %s: want type A, port %s (service worker, WORKER_HTTP_ADDR), got type %q port %d", sc.JobName, port("worker"), d.Type, d.Port)
			}
		}
		for _, st := range sc.StaticConfigs {
			for _, target := range st.Targets {
				host, p, _ := splitHostPort(target)
				if host != "monitor" {
					continue
				}
				monitor = true
				if p != port("monitor") {
					t.Errorf("deploy/prometheus.yml: job %s scrapes %s, but service monitor listens on port %s (MONITOR_ADDR)", sc.JobName, target, port("monitor"))
				}
				if sc.BasicAuth == nil {
					t.Errorf("deploy/prometheus.yml: job %s: the monitor's /metrics needs basic_auth (MONITOR_USER, MONITOR_PASSWORD)", sc.JobName)
					continue
				}
				checkPrometheusCredentials(t, c, prom, sc.JobName, sc.BasicAuth.UsernameFile, sc.BasicAuth.PasswordFile)
			}
		}
	}
	if !workers {
		t.Errorf("deploy/prometheus.yml: no dns_sd_configs job for the name worker: scaled workers would not all be scraped")
	}
	if !monitor {
		t.Errorf("deploy/prometheus.yml: no job scrapes the service monitor")
	}
}

// checkPrometheusCredentials: the files basic_auth reads are the
// monitor's MONITOR_USER and MONITOR_PASSWORD, handed over by compose.
func checkPrometheusCredentials(t *testing.T, c *compose, prom *service, job, userFile, passFile string) {
	t.Helper()
	menv := c.service(t, "monitor").env()
	found := map[string]bool{}
	for _, v := range prom.Configs {
		m, _ := v.(map[string]any)
		if m == nil || fmt.Sprint(m["target"]) != userFile {
			continue
		}
		found[userFile] = true
		cfg, ok := c.Configs[fmt.Sprint(m["source"])]
		if !ok || cfg.Content == nil || *cfg.Content != menv["MONITOR_USER"] {
			t.Errorf("service prometheus: the config at %s must hold the monitor's MONITOR_USER (%q)", userFile, menv["MONITOR_USER"])
		}
	}
	for _, v := range prom.Secrets {
		name, m := fmt.Sprint(v), map[string]any(nil)
		if m, _ = v.(map[string]any); m != nil {
			name = fmt.Sprint(m["source"])
			if m["target"] != nil && m["target"] != name && m["target"] != "/run/secrets/"+name {
				continue // not at /run/secrets/<name>
			}
		}
		if "/run/secrets/"+name != passFile {
			continue
		}
		found[passFile] = true
		// Compose writes a secret owned by root, mode 0400, unless told
		// otherwise; prom/prometheus runs as nobody.
		mode, _ := m["mode"].(int)
		if m == nil || (fmt.Sprint(m["uid"]) != "65534" && mode&0o004 == 0) {
			t.Errorf("service prometheus: the secret %s must be readable by nobody, the user Prometheus runs as: give it uid \"65534\" (or mode 0444)", name)
		}
		if c.Secrets[name].Environment != "MONITOR_PASSWORD" {
			t.Errorf("service prometheus: the secret %s must come from MONITOR_PASSWORD, the monitor's password", name)
		}
	}
	for _, f := range []string{userFile, passFile} {
		if f == "" || !found[f] {
			t.Errorf("deploy/prometheus.yml: job %s reads %q, which compose does not give the prometheus service", job, f)
		}
	}
}

// instruction is one Dockerfile instruction, continuation lines joined.
type instruction struct {
	cmd  string // upper case
	args string
}

type stage struct {
	from   string // image, ARGs substituted
	name   string
	instrs []instruction
}

func parseDockerfile(t *testing.T) []stage {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	var instrs []instruction
	var cur strings.Builder
	for _, line := range strings.Split(string(b), "\n") {
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "#") || (trimmed == "" && cur.Len() == 0) {
			continue
		}
		if s, ok := strings.CutSuffix(trimmed, `\`); ok {
			cur.WriteString(s + " ")
			continue
		}
		cur.WriteString(trimmed)
		cmd, args, _ := strings.Cut(strings.TrimSpace(cur.String()), " ")
		instrs = append(instrs, instruction{strings.ToUpper(cmd), strings.TrimSpace(args)})
		cur.Reset()
	}
	args := map[string]string{}
	var stages []stage
	for _, in := range instrs {
		switch {
		case in.cmd == "ARG" && len(stages) == 0:
			k, v, _ := strings.Cut(in.args, "=")
			args[k] = strings.Trim(v, `"`)
		case in.cmd == "FROM":
			var st stage
			f := strings.Fields(in.args)
			for _, w := range f {
				if strings.HasPrefix(w, "--") {
					continue
				}
				if st.from == "" {
					st.from = os.Expand(w, func(k string) string { return args[k] })
				}
			}
			if len(f) >= 2 && strings.EqualFold(f[len(f)-2], "AS") {
				st.name = f[len(f)-1]
			}
			stages = append(stages, st)
		case len(stages) > 0:
			stages[len(stages)-1].instrs = append(stages[len(stages)-1].instrs, in)
		}
	}
	if len(stages) < 2 {
		t.Fatalf("Dockerfile: want a multi-stage build (a Go build stage and a runtime stage), got %d stage(s)", len(stages))
	}
	return stages
}

func TestDockerfile(t *testing.T) {
	stages := parseDockerfile(t)
	final := stages[len(stages)-1]

	// The final stage runs as a user other than root.
	user := ""
	for _, in := range final.instrs {
		if in.cmd == "USER" {
			user = in.args
		}
	}
	name, _, _ := strings.Cut(user, ":")
	switch {
	case user == "" && !strings.HasSuffix(final.from, ":nonroot"):
		t.Errorf("Dockerfile: the final stage (FROM %s) has no USER: it would run as root", final.from)
	case user != "" && (name == "root" || name == "0"):
		t.Errorf("Dockerfile: the final stage runs as %s; want a non-root user", user)
	}
	if !strings.HasPrefix(final.from, "gcr.io/distroless/static") && !strings.HasPrefix(final.from, "debian:") {
		t.Errorf("Dockerfile: the final stage is FROM %s; want gcr.io/distroless/static-debian12:nonroot or debian:bookworm-slim", final.from)
	}

	// The build: static, trimmed, every command, with a module cache.
	var build *stage
	var run string
	for i := range stages[:len(stages)-1] {
		for _, in := range stages[i].instrs {
			if in.cmd == "RUN" && strings.Contains(in.args, "go build") {
				build, run = &stages[i], in.args
			}
		}
	}
	if build == nil {
		t.Fatal("Dockerfile: no stage before the last one runs go build")
	}
	cgoOff := strings.Contains(run, "CGO_ENABLED=0")
	for _, in := range build.instrs {
		if in.cmd == "ENV" && strings.Contains(in.args, "CGO_ENABLED=0") {
			cgoOff = true
		}
	}
	if !cgoOff {
		t.Errorf("Dockerfile: the go build must have CGO_ENABLED=0: the runtime stage has no C library to link against")
	}
	for _, want := range []string{"-trimpath", "./cmd/...", "--mount=type=cache,target=/go/pkg/mod"} {
		if !strings.Contains(run, want) {
			t.Errorf("Dockerfile: the go build RUN lacks %s: %s", want, run)
		}
	}
	copied := false
	for _, in := range final.instrs {
		if in.cmd == "COPY" && (strings.Contains(in.args, "--from="+build.name) || strings.Contains(in.args, "--from=0")) {
			copied = true
		}
	}
	if !copied {
		t.Errorf("Dockerfile: the final stage copies nothing from the build stage %q", build.name)
	}

	// The Go of the build image is at least go.mod's: the golang images set
	// GOTOOLCHAIN=local and refuse an older one.
	gomod, err := os.ReadFile(filepath.Join(root, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^go (\S+)`).FindSubmatch(gomod)
	if m == nil {
		t.Fatal("go.mod: no go directive")
	}
	need := string(m[1])
	img := regexp.MustCompile(`^golang:(\d+\.\d+(?:\.\d+)?)`).FindStringSubmatch(build.from)
	if img == nil {
		t.Fatalf("Dockerfile: the build stage is FROM %s; want golang:<version>-bookworm", build.from)
	}
	if !goVersionAtLeast(img[1], need) {
		t.Errorf("Dockerfile: the build image %s has Go %s, but go.mod needs go %s", build.from, img[1], need)
	}
}

// goVersionAtLeast compares Go versions; a tag without a patch (1.26) is
// the newest patch of that release.
func goVersionAtLeast(have, need string) bool {
	h, n := strings.Split(have, "."), strings.Split(need, ".")
	for i := 0; i < len(n); i++ {
		if i >= len(h) {
			return true
		}
		a, _ := strconv.Atoi(h[i])
		b, _ := strconv.Atoi(n[i])
		if a != b {
			return a > b
		}
	}
	return true
}

// Nothing is published beyond this host unless the operator says so: the
// sandbox's admin API and Prometheus have no authentication at all, and
// the monitor's basic auth is no reason to face every network by default.
func TestPortsBindLoopbackByDefault(t *testing.T) {
	c := loadCompose(t)
	for name, s := range c.Services {
		for _, p := range s.Ports {
			pm, err := parsePort(p)
			if err != nil {
				t.Errorf("service %q: %v", name, err)
				continue
			}
			if pm.hostIP != "127.0.0.1" {
				t.Errorf("service %q publishes %q on %q by default; want 127.0.0.1 (an override variable may widen it)", name, pm.raw, pm.hostIP)
			}
		}
	}
}
