package e2e

import (
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The sandbox as a program: it writes its keys and env file, answers,
// stops on SIGTERM, and a restart keeps the same merchant and keys.
func TestWxsandboxRunsStandalone(t *testing.T) {
	dir := t.TempDir()
	run := func() (env map[string]string, stop func()) {
		l, _ := net.Listen("tcp", "127.0.0.1:0")
		addr := l.Addr().String()
		l.Close()
		cmd := exec.Command(filepath.Join(binDir, "wxsandbox"), "--addr", addr, "--data-dir", dir)
		out := &syncBuffer{}
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(20 * time.Second)
		for {
			if resp, err := http.Get("http://" + addr + "/sandbox/healthz"); err == nil && resp.StatusCode == 200 {
				resp.Body.Close()
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("wxsandbox did not answer:\n%s", out)
			}
			time.Sleep(50 * time.Millisecond)
		}
		if !strings.Contains(out.String(), "/sandbox/") || !strings.Contains(out.String(), "no signature") {
			t.Errorf("the start line does not point at the admin API:\n%s", out)
		}
		b, err := os.ReadFile(filepath.Join(dir, "sandbox.env"))
		if err != nil {
			t.Fatal(err)
		}
		env = map[string]string{}
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, "="); ok && !strings.HasPrefix(k, "#") {
				env[k] = strings.Trim(v, `'"`)
			}
		}
		if env["WECHATPAY_BASE_URL"] != "http://"+addr {
			t.Errorf("env file base URL %q, listening on %s", env["WECHATPAY_BASE_URL"], addr)
		}
		return env, func() {
			cmd.Process.Signal(syscall.SIGTERM)
			if err := cmd.Wait(); err != nil {
				t.Errorf("wxsandbox exit after SIGTERM: %v\n%s", err, out)
			}
		}
	}
	first, stop := run()
	for _, k := range []string{"WECHATPAY_MCHID", "WECHATPAY_MCH_SERIAL", "WECHATPAY_PRIVATE_KEY", "WECHATPAY_PUBLIC_KEY",
		"WECHATPAY_PUBLIC_KEY_ID", "WECHATPAY_APPID", "SANDBOX_STOCK_ID", "SANDBOX_MULTIUSE_STOCK_ID"} {
		if first[k] == "" {
			t.Errorf("sandbox.env lacks %s", k)
		}
	}
	if fi, err := os.Stat(first["WECHATPAY_PRIVATE_KEY"]); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("merchant key: %v, mode %v", err, fi.Mode())
	}
	key, _ := os.ReadFile(first["WECHATPAY_PRIVATE_KEY"])
	stop()

	second, stop := run()
	defer stop()
	for _, k := range []string{"WECHATPAY_MCHID", "WECHATPAY_MCH_SERIAL", "WECHATPAY_PUBLIC_KEY_ID", "SANDBOX_STOCK_ID"} {
		if first[k] != second[k] {
			t.Errorf("restart changed %s: %s → %s", k, first[k], second[k])
		}
	}
	if again, _ := os.ReadFile(second["WECHATPAY_PRIVATE_KEY"]); string(again) != string(key) {
		t.Error("restart generated a new merchant key")
	}
}
