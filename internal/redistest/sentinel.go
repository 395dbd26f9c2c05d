package redistest

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// MasterName is the name the Sentinels of StartSentinel monitor.
const MasterName = "mymaster"

// Sentinel is a Sentinel-managed deployment owned by a test: redis-server
// processes (at start a master and its replica, or replicas, all with
// appendonly yes) and three Sentinels with a quorum of 2, all on loopback.
//
// Redis replicates asynchronously: the master acknowledges a write before
// the replica has it. KillMaster therefore may lose the last writes the
// master acknowledged, as a real crash would. Failover first waits (WAIT)
// until the replicas have every write made so far, then asks a Sentinel to
// fail over: nothing written before Failover is lost. But Sentinel does not
// pause the old master (as the FAILOVER command of a lone master does): it
// keeps accepting writes for the second or so until clients hear of the
// new master, and those writes are discarded when it becomes a replica.
// SentinelOptions.ServerArgs "--min-replicas-to-write" narrows that to the
// writes in flight at the instant of the promotion, at a price in
// availability (see there).
type Sentinel struct {
	// Nodes are the data servers, the first the master at start; which one
	// is the master changes with a failover (MasterAddr says).
	Nodes []*Server
	// Sentinels are the three Sentinel processes.
	Sentinels []*Server
	tb        testing.TB
}

// StartSentinel starts the deployment (a master, one replica) and returns
// once every Sentinel names the master, sees the replica in sync and knows
// the two other Sentinels, so that a failover can start at once. It takes
// about two seconds, mostly the Sentinels discovering each other.
func StartSentinel(tb testing.TB) *Sentinel {
	tb.Helper()
	return StartSentinelWith(tb, SentinelOptions{})
}

// SentinelOptions changes what StartSentinelWith starts.
type SentinelOptions struct {
	// Replicas of the master: 1 when 0.
	Replicas int
	// ServerArgs are added to every data server's command line. For
	// instance "--min-replicas-to-write", "1" with one replica (the value
	// must equal the number of replicas): the old master then refuses
	// writes (NOREPLICAS) as soon as its promoted replica drops its link,
	// so only the writes in flight at that instant can be lost, instead of
	// all those of the switch. The price: the new master refuses writes too
	// until it has as many replicas, that is until a Sentinel turns the old
	// master into its replica, some 10s after a Failover (after KillMaster,
	// not until the old one restarts).
	ServerArgs []string
	// ReplicationDelay, when not 0, puts the master behind a proxy on its
	// address (Nodes[0].Addr, and what the Sentinels and replicas use) that
	// passes clients' traffic through but delivers the replication stream
	// this long late, and drops what is still in flight when the master
	// dies, as a crashed host does: KillMaster then loses about this
	// long's worth of acknowledged writes, unless clients WAIT.
	ReplicationDelay time.Duration
}

// StartSentinelWith is StartSentinel with options.
func StartSentinelWith(tb testing.TB, o SentinelOptions) *Sentinel {
	tb.Helper()
	if o.Replicas < 1 {
		o.Replicas = 1
	}
	s := &Sentinel{tb: tb}
	repl := append([]string{"--appendonly", "yes", "--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1"}, o.ServerArgs...)
	master := Start(tb, repl...)
	if o.ReplicationDelay > 0 {
		master.Addr = startDelayProxy(tb, master.Addr, o.ReplicationDelay).addr
	}
	_, mport, _ := net.SplitHostPort(master.Addr)
	s.Nodes = []*Server{master}
	for range o.Replicas {
		replica := Start(tb, append(repl, "--replicaof", "127.0.0.1", mport)...)
		s.Nodes = append(s.Nodes, replica)
		waitFor(tb, 10*time.Second, "the replica to sync with its master", func(ctx context.Context) error {
			info, err := client(ctx, replica.Addr).Info(ctx, "replication").Result()
			if err != nil {
				return err
			}
			if v := infoField(info, "master_link_status"); v != "up" {
				return fmt.Errorf("master_link_status:%s", v)
			}
			return nil
		})
	}

	bin := serverPath(tb)
	for _, port := range freePorts(tb, 3) {
		dir := tb.TempDir()
		conf := filepath.Join(dir, "sentinel.conf")
		text := strings.Join([]string{
			fmt.Sprintf("port %d", port),
			"bind 127.0.0.1",
			fmt.Sprintf("dir %q", dir),
			fmt.Sprintf("logfile %q", filepath.Join(dir, "sentinel.log")),
			"sentinel resolve-hostnames no",
			fmt.Sprintf("sentinel monitor %s 127.0.0.1 %s 2", MasterName, mport),
			fmt.Sprintf("sentinel down-after-milliseconds %s 1000", MasterName),
			fmt.Sprintf("sentinel failover-timeout %s 5000", MasterName),
			fmt.Sprintf("sentinel parallel-syncs %s 1", MasterName),
		}, "\n") + "\n"
		if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
			tb.Fatal(err)
		}
		sn := &Server{Addr: "127.0.0.1:" + strconv.Itoa(port), Dir: dir, tb: tb,
			logf: filepath.Join(dir, "sentinel.log"), args: []string{bin, conf, "--sentinel"}}
		sn.start()
		tb.Cleanup(sn.Kill)
		s.Sentinels = append(s.Sentinels, sn)
	}
	s.waitSettled(master.Addr, 15*time.Second)
	return s
}

// URL is a redis-sentinel:// URL naming the three Sentinels and the master.
func (s *Sentinel) URL() string {
	addrs := make([]string, len(s.Sentinels))
	for i, sn := range s.Sentinels {
		addrs[i] = sn.Addr
	}
	return "redis-sentinel://" + strings.Join(addrs, ",") + "/" + MasterName
}

// MasterAddr is the master's host:port as a running Sentinel names it.
func (s *Sentinel) MasterAddr() string {
	s.tb.Helper()
	var last error
	for _, sn := range s.Sentinels {
		if !sn.Running() {
			continue
		}
		addr, err := sentinelMaster(context.Background(), sn.Addr)
		if err == nil {
			return addr
		}
		last = err
	}
	s.tb.Fatalf("redistest: no Sentinel names the master: %v", last)
	return ""
}

// Node returns the data server listening on addr, or nil.
func (s *Sentinel) Node(addr string) *Server {
	for _, n := range s.Nodes {
		if n.Addr == addr {
			return n
		}
	}
	return nil
}

// KillMaster kills the current master with SIGKILL and returns its
// address; the Sentinels notice after down-after-milliseconds (1s) and
// promote a replica (WaitForNewMaster). Writes the master acknowledged but
// had not yet sent to that replica are lost.
func (s *Sentinel) KillMaster() string {
	s.tb.Helper()
	addr := s.MasterAddr()
	n := s.Node(addr)
	if n == nil {
		s.tb.Fatalf("redistest: the Sentinels name %s as master, which is not one of %v", addr, s.Nodes)
	}
	n.Kill()
	return addr
}

// Failover waits until every running replica has every write the master
// accepted (WAIT), then has a Sentinel fail over (SENTINEL FAILOVER), and
// returns the old master's address without waiting for the end
// (WaitForNewMaster).
func (s *Sentinel) Failover() string {
	s.tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr := s.MasterAddr()
	replicas := -1
	for _, n := range s.Nodes {
		if n.Running() {
			replicas++
		}
	}
	n, err := client(ctx, addr).Do(ctx, "WAIT", replicas, 5000).Int()
	if err != nil || n < replicas {
		s.tb.Fatalf("redistest: WAIT on master %s: %d of %d replicas in sync, %v", addr, n, replicas, err)
	}
	var last error
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		for _, sn := range s.Sentinels {
			if !sn.Running() {
				continue
			}
			sc := redis.NewSentinelClient(&redis.Options{Addr: sn.Addr})
			last = sc.Failover(ctx, MasterName).Err()
			_ = sc.Close()
			if last == nil {
				return addr
			}
		}
		time.Sleep(100 * time.Millisecond) // INPROG, NOGOODSLAVE: not yet
	}
	s.tb.Fatalf("redistest: SENTINEL FAILOVER %s refused for 10s: %v", MasterName, last)
	return ""
}

// WaitForNewMaster waits until every running Sentinel names the same
// master, other than old, and that server says it is a master; it returns
// its address. It takes about a second after Failover, two to three after
// KillMaster.
//
// After Failover the old master keeps running as a master, accepting the
// writes of clients that have not yet switched, until a Sentinel turns it
// into a replica: Sentinel waits 8s or more before doing so, and those
// writes are then lost. WaitForReplica waits for that.
func (s *Sentinel) WaitForNewMaster(old string, timeout time.Duration) string {
	s.tb.Helper()
	var addr string
	waitFor(s.tb, timeout, "a new master", func(ctx context.Context) error {
		addr = ""
		for _, sn := range s.Sentinels {
			if !sn.Running() {
				continue
			}
			a, err := sentinelMaster(ctx, sn.Addr)
			if err != nil {
				return err
			}
			if a == old {
				return fmt.Errorf("sentinel %s still names %s", sn.Addr, old)
			}
			if addr != "" && a != addr {
				return fmt.Errorf("sentinels disagree: %s and %s", addr, a)
			}
			addr = a
		}
		role, err := client(ctx, addr).Do(ctx, "ROLE").Slice()
		if err != nil {
			return err
		}
		if len(role) == 0 || role[0] != "master" {
			return fmt.Errorf("%s says it is %v", addr, role)
		}
		return nil
	})
	return addr
}

// WaitForReplica waits until the server at addr is a replica in sync with
// its master, as the old master becomes some 8-10s after a Failover (or
// after a Restart following KillMaster). Only then can the next failover
// promote it.
func (s *Sentinel) WaitForReplica(addr string, timeout time.Duration) {
	s.tb.Helper()
	waitFor(s.tb, timeout, addr+" to become a replica in sync", func(ctx context.Context) error {
		info, err := client(ctx, addr).Info(ctx, "replication").Result()
		if err != nil {
			return err
		}
		if role, link := infoField(info, "role"), infoField(info, "master_link_status"); role != "slave" || link != "up" {
			return fmt.Errorf("role:%s master_link_status:%s", role, link)
		}
		return nil
	})
}

// waitSettled waits until every Sentinel names master, sees every replica
// in sync and knows the other Sentinels.
func (s *Sentinel) waitSettled(master string, timeout time.Duration) {
	s.tb.Helper()
	waitFor(s.tb, timeout, "the Sentinels to agree", func(ctx context.Context) error {
		for _, sn := range s.Sentinels {
			sc := redis.NewSentinelClient(&redis.Options{Addr: sn.Addr})
			defer sc.Close()
			m, err := sc.Master(ctx, MasterName).Result()
			if err != nil {
				return err
			}
			if addr := net.JoinHostPort(m["ip"], m["port"]); addr != master || m["flags"] != "master" {
				return fmt.Errorf("sentinel %s: master %s flags %q", sn.Addr, addr, m["flags"])
			}
			if m["num-other-sentinels"] != strconv.Itoa(len(s.Sentinels)-1) {
				return fmt.Errorf("sentinel %s knows %s other sentinels", sn.Addr, m["num-other-sentinels"])
			}
			reps, err := sc.Replicas(ctx, MasterName).Result()
			if err != nil {
				return err
			}
			if len(reps) != len(s.Nodes)-1 {
				return fmt.Errorf("sentinel %s sees %d replicas", sn.Addr, len(reps))
			}
			for _, r := range reps {
				if r["flags"] != "slave" || r["master-link-status"] != "ok" {
					return fmt.Errorf("sentinel %s sees replica %s:%s flags %q link %q", sn.Addr, r["ip"], r["port"], r["flags"], r["master-link-status"])
				}
			}
		}
		return nil
	})
}

func sentinelMaster(ctx context.Context, sentinelAddr string) (string, error) {
	sc := redis.NewSentinelClient(&redis.Options{Addr: sentinelAddr, DialTimeout: time.Second, ReadTimeout: time.Second})
	defer sc.Close()
	hp, err := sc.GetMasterAddrByName(ctx, MasterName).Result()
	if err != nil {
		return "", fmt.Errorf("sentinel %s: %w", sentinelAddr, err)
	}
	return net.JoinHostPort(hp[0], hp[1]), nil
}

// client is a short-lived connection to one server, closed when ctx's
// waitFor round ends.
func client(ctx context.Context, addr string) *redis.Client {
	c := redis.NewClient(&redis.Options{Addr: addr, DialTimeout: time.Second, ReadTimeout: 6 * time.Second,
		MaxRetries: -1, Protocol: 2})
	context.AfterFunc(ctx, func() { _ = c.Close() })
	return c
}

// waitFor polls cond every 50ms until it returns nil, failing the test
// with cond's last error after timeout.
func waitFor(tb testing.TB, timeout time.Duration, what string, cond func(ctx context.Context) error) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err := cond(ctx)
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("redistest: waited %v for %s: %v", timeout, what, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// infoField reads one "name:value" line of INFO or CLUSTER INFO.
func infoField(info, name string) string {
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), name+":"); ok {
			return v
		}
	}
	return ""
}
