// Package bench holds the throughput benchmarks of the whole pipeline:
// enqueueing a campaign into Redis, and dispatching sends to the sandbox.
// They start their own redis-servers and sandboxes, so they only run with
// -bench; `go test ./...` compiles them and runs nothing here. See
// docs/benchmarks.md for the command, the figures and what they mean.
package bench

import (
	"bufio"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// envInt reads a positive integer from the environment, e.g. BENCH_ROWS,
// so that a developer can run a benchmark smaller than its default.
func envInt(b *testing.B, name string, def int) int {
	b.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(strings.ReplaceAll(v, "_", ""))
	if err != nil || n < 1 {
		b.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}

// openID is a realistic 28-character openid, unique per i.
func openID(prefix string, i int) string {
	id := strconv.Itoa(i)
	return prefix + strings.Repeat("0", 28-len(prefix)-len(id)) + id
}

// writeCampaignCSV writes a recipients file of n rows with only the openid
// column, the common case: out_request_no is derived by the producer.
func writeCampaignCSV(b *testing.B, path, prefix string, n int) {
	b.Helper()
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	w := bufio.NewWriterSize(f, 1<<20)
	w.WriteString("openid\n")
	for i := range n {
		w.WriteString(openID(prefix, i))
		w.WriteByte('\n')
	}
	if err := w.Flush(); err != nil {
		b.Fatal(err)
	}
	if err := f.Close(); err != nil {
		b.Fatal(err)
	}
}

// redisInfo returns the fields of one INFO section.
func redisInfo(b *testing.B, rdb redis.UniversalClient, section string) map[string]string {
	b.Helper()
	s, err := rdb.Info(context.Background(), section).Result()
	if err != nil {
		b.Fatalf("INFO %s: %v", section, err)
	}
	m := map[string]string{}
	for _, line := range strings.Split(s, "\r\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && !strings.HasPrefix(k, "#") {
			m[k] = v
		}
	}
	return m
}

// usedMemory is INFO memory's used_memory, in bytes.
func usedMemory(b *testing.B, rdb redis.UniversalClient) int64 {
	b.Helper()
	n, err := strconv.ParseInt(redisInfo(b, rdb, "memory")["used_memory"], 10, 64)
	if err != nil {
		b.Fatalf("used_memory: %v", err)
	}
	return n
}

// redisCPU is the CPU time redis-server has used, user plus system.
func redisCPU(b *testing.B, rdb redis.UniversalClient) time.Duration {
	b.Helper()
	m := redisInfo(b, rdb, "cpu")
	u, err1 := strconv.ParseFloat(m["used_cpu_user"], 64)
	s, err2 := strconv.ParseFloat(m["used_cpu_sys"], 64)
	if err1 != nil || err2 != nil {
		b.Fatalf("INFO cpu: %v", m)
	}
	return time.Duration((u + s) * float64(time.Second))
}

// commandStats summarises INFO commandstats on one line for the log (the
// testing package keeps only ten lines of a benchmark's log): every
// command's calls per unit (row, send) × µs per call, busiest first.
// Commands run inside scripts are counted on their own too, and their time
// again in evalsha's.
func commandStats(b *testing.B, rdb redis.UniversalClient, units int64) string {
	b.Helper()
	type stat struct {
		name          string
		calls         int64
		usec, perCall float64
	}
	var stats []stat
	for k, v := range redisInfo(b, rdb, "commandstats") {
		st := stat{name: strings.TrimPrefix(k, "cmdstat_")}
		for _, kv := range strings.Split(v, ",") {
			key, val, _ := strings.Cut(kv, "=")
			switch key {
			case "calls":
				st.calls, _ = strconv.ParseInt(val, 10, 64)
			case "usec":
				st.usec, _ = strconv.ParseFloat(val, 64)
			case "usec_per_call":
				st.perCall, _ = strconv.ParseFloat(val, 64)
			}
		}
		stats = append(stats, st)
	}
	sort.Slice(stats, func(i, j int) bool { return stats[i].usec > stats[j].usec })
	var parts []string
	for _, st := range stats {
		if float64(st.calls)/float64(units) >= 0.01 {
			parts = append(parts, fmt.Sprintf("%s %.2f×%.1fµs", st.name, float64(st.calls)/float64(units), st.perCall))
		}
	}
	return strings.Join(parts, ", ")
}

func rusageCPU(ru *syscall.Rusage) time.Duration {
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// selfCPU is the CPU time this process has used so far.
func selfCPU(b *testing.B) time.Duration {
	b.Helper()
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return rusageCPU(&ru)
}

// rusageThread is Linux's RUSAGE_THREAD.
const rusageThread = 1

// threadCPU is the CPU time the calling OS thread has used so far; the
// caller must be locked to its thread.
func threadCPU(b *testing.B) time.Duration {
	b.Helper()
	var ru syscall.Rusage
	if err := syscall.Getrusage(rusageThread, &ru); err != nil {
		b.Fatal(err)
	}
	return rusageCPU(&ru)
}

// procCPU reads a process's CPU time from /proc/<pid>/stat (utime and
// stime, in clock ticks of 10 ms).
func procCPU(b *testing.B, pid int) time.Duration {
	b.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	s := string(data)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	// fields[0] is field 3 (state); utime and stime are fields 14 and 15.
	ut, err1 := strconv.ParseInt(fields[11], 10, 64)
	st, err2 := strconv.ParseInt(fields[12], 10, 64)
	if err1 != nil || err2 != nil {
		b.Fatalf("/proc/%d/stat: %q", pid, s)
	}
	const tick = 10 * time.Millisecond // USER_HZ is 100 on Linux
	return time.Duration(ut+st) * tick
}

// signRate is how many RSA SHA256 PKCS#1 v1.5 signatures one core makes per
// second of its own CPU time: one goroutine, locked to its thread, signs in
// a loop for about d and divides by the thread's CPU time, so that other
// processes taking the core do not lower the figure.
func signRate(b *testing.B, key *rsa.PrivateKey, d time.Duration) (sigs int, cpu time.Duration) {
	b.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	digest := sha256.Sum256([]byte("GET\n/v3/marketing/favor/users/o/coupons\n1700000000\nNONCE\n\n"))
	start, cpu0 := time.Now(), threadCPU(b)
	for time.Since(start) < d {
		for range 10 {
			if _, err := rsa.SignPKCS1v15(rand.Reader, key, crypto.SHA256, digest[:]); err != nil {
				b.Fatal(err)
			}
		}
		sigs += 10
	}
	return sigs, threadCPU(b) - cpu0
}

// buildWorker builds ./cmd/worker into a temporary directory.
func buildWorker(b *testing.B) string {
	b.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	out := filepath.Join(b.TempDir(), "worker")
	cmd := exec.Command(goBin, "build", "-o", out, "github.com/couponflow/dispatcher/cmd/worker")
	if msg, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("building the worker: %v\n%s", err, msg)
	}
	return out
}
