package e2e

import (
	"encoding/json"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// "Run any number of workers" on one host: the second worker finds the
// default metrics address taken and serves on a free port, saying so; an
// address asked for explicitly still fails hard.
func TestWorkersOnOneHostShareTheDefaultMetricsAddress(t *testing.T) {
	r := newRig(t)
	var env []string
	for _, kv := range r.env {
		if !strings.HasPrefix(kv, "WORKER_HTTP_ADDR=") {
			env = append(env, kv)
		}
	}
	r.env = env
	addrOf := func(p *proc) string {
		deadline := time.Now().Add(20 * time.Second)
		for time.Now().Before(deadline) {
			for _, line := range strings.Split(p.out.String(), "\n") {
				var m map[string]any
				if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == "serving metrics and health" {
					return m["addr"].(string)
				}
			}
			select {
			case <-p.done:
				t.Fatalf("worker exited: %v\n%s", p.err, tail(p.out.String(), 10))
			case <-time.After(100 * time.Millisecond):
			}
		}
		t.Fatalf("no metrics address logged:\n%s", tail(p.out.String(), 10))
		return ""
	}
	a, b := r.worker("a"), r.worker("b")
	addrA, addrB := addrOf(a), addrOf(b)
	if addrA == addrB {
		t.Fatalf("both workers on %s", addrA)
	}
	for _, addr := range []string{addrA, addrB} {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s/healthz: %v %v", addr, resp, err)
		}
		resp.Body.Close()
	}
	if !strings.Contains(a.out.String()+b.out.String(), "the default metrics address is taken") {
		t.Log("the default address was free for neither worker (another program holds it); the fallback ran for both")
	}
	c := r.start(filepath.Join(binDir, "worker"), "--http-addr", addrA)
	select {
	case <-c.done:
	case <-time.After(20 * time.Second):
		c.signal(9)
		t.Fatal("a worker asked for a taken address started")
	}
	if code := c.cmd.ProcessState.ExitCode(); code != 1 || !strings.Contains(c.out.String(), "--http-addr") {
		t.Fatalf("explicit taken address: exit %d\n%s", code, tail(c.out.String(), 5))
	}
}
