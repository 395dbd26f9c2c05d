package redistest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Cluster is a Redis Cluster owned by a test: masters redis-server
// processes, no replicas, every hash slot assigned.
type Cluster struct {
	Nodes []*Server
	tb    testing.TB
}

// StartCluster starts masters (at least 3) cluster-enabled servers on free
// loopback ports (client and bus port both chosen), joins them with
// redis-cli --cluster create (REDIS_CLI, or redis-cli on PATH), and returns
// once every node reports cluster_state:ok and knows every other. It takes
// about two seconds.
func StartCluster(tb testing.TB, masters int) *Cluster {
	tb.Helper()
	if masters < 3 {
		tb.Fatalf("redistest: a cluster needs at least 3 masters, not %d", masters)
	}
	cli := os.Getenv("REDIS_CLI")
	if cli == "" {
		cli = "redis-cli"
	}
	cliPath, err := exec.LookPath(cli)
	if err != nil {
		tb.Fatalf("redistest: %s not found (apt-get install redis-tools, or set REDIS_CLI): %v", cli, err)
	}
	c := &Cluster{tb: tb}
	ports := freePorts(tb, 2*masters)
	for i := range masters {
		c.Nodes = append(c.Nodes, startOn(tb, ports[2*i],
			"--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
			"--cluster-node-timeout", "2000", "--cluster-port", strconv.Itoa(ports[2*i+1])))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	args := append([]string{"--cluster", "create"}, c.Addrs()...)
	args = append(args, "--cluster-replicas", "0", "--cluster-yes")
	if out, err := exec.CommandContext(ctx, cliPath, args...).CombinedOutput(); err != nil {
		tb.Fatalf("redistest: redis-cli %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	waitFor(tb, 15*time.Second, "cluster_state:ok on every node", func(ctx context.Context) error {
		for _, n := range c.Nodes {
			info, err := client(ctx, n.Addr).ClusterInfo(ctx).Result()
			if err != nil {
				return err
			}
			if st := infoField(info, "cluster_state"); st != "ok" {
				return fmt.Errorf("%s: cluster_state:%s", n.Addr, st)
			}
			if k := infoField(info, "cluster_known_nodes"); k != strconv.Itoa(masters) {
				return fmt.Errorf("%s: cluster_known_nodes:%s", n.Addr, k)
			}
		}
		return nil
	})
	return c
}

// Addrs are the nodes' host:port.
func (c *Cluster) Addrs() []string {
	addrs := make([]string, len(c.Nodes))
	for i, n := range c.Nodes {
		addrs[i] = n.Addr
	}
	return addrs
}

// URL is a redis-cluster:// URL naming every node.
func (c *Cluster) URL() string { return "redis-cluster://" + strings.Join(c.Addrs(), ",") }

// Client returns a cluster client, closed with the test.
func (c *Cluster) Client() *redis.ClusterClient {
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: c.Addrs()})
	c.tb.Cleanup(func() { _ = cc.Close() })
	return cc
}
