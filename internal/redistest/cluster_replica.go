package redistest

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// AddReplica starts one more cluster node, makes it a replica of
// c.Nodes[master] (CLUSTER MEET, CLUSTER REPLICATE) and returns it once the
// master counts it as a connected replica in sync. It is not added to
// c.Nodes, which stay the masters.
func (c *Cluster) AddReplica(master int) *Server {
	c.tb.Helper()
	ports := freePorts(c.tb, 2)
	r := startOn(c.tb, ports[0],
		"--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
		"--cluster-node-timeout", "2000", "--cluster-port", strconv.Itoa(ports[1]))
	m := c.Nodes[master]
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	nodes, err := client(ctx, m.Addr).ClusterNodes(ctx).Result()
	if err != nil {
		c.tb.Fatalf("redistest: CLUSTER NODES of %s: %v", m.Addr, err)
	}
	// "<id> <ip>:<port>@<bus port> myself,master …"
	var id, bus string
	for _, line := range strings.Split(nodes, "\n") {
		f := strings.Fields(line)
		if len(f) > 2 && strings.Contains(f[2], "myself") {
			id = f[0]
			_, bus, _ = strings.Cut(f[1], "@")
			bus, _, _ = strings.Cut(bus, ",")
		}
	}
	if id == "" || bus == "" {
		c.tb.Fatalf("redistest: no myself line in CLUSTER NODES of %s:\n%s", m.Addr, nodes)
	}
	if err := client(ctx, r.Addr).Do(ctx, "CLUSTER", "MEET", "127.0.0.1", portOf(m.Addr), bus).Err(); err != nil {
		c.tb.Fatalf("redistest: CLUSTER MEET: %v", err)
	}
	waitFor(c.tb, 15*time.Second, r.Addr+" to replicate "+m.Addr, func(ctx context.Context) error {
		// Refused until the new node has learnt of the master.
		return client(ctx, r.Addr).Do(ctx, "CLUSTER", "REPLICATE", id).Err()
	})
	waitFor(c.tb, 15*time.Second, m.Addr+" to have its replica in sync", func(ctx context.Context) error {
		info, err := client(ctx, r.Addr).Info(ctx, "replication").Result()
		if err != nil {
			return err
		}
		if link := infoField(info, "master_link_status"); link != "up" {
			return fmt.Errorf("master_link_status:%s", link)
		}
		info, err = client(ctx, m.Addr).Info(ctx, "replication").Result()
		if err != nil {
			return err
		}
		if n := infoField(info, "connected_slaves"); n == "0" || n == "" {
			return fmt.Errorf("connected_slaves:%s", n)
		}
		return nil
	})
	return r
}
