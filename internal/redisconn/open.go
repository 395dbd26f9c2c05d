package redisconn

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

const (
	dialTimeout = 5 * time.Second
	ioTimeout   = 5 * time.Second // read and write
	// checkTimeout bounds OpenSpec's checks: a Sentinel or cluster client
	// may dial several nodes before it answers.
	checkTimeout = 15 * time.Second
)

// OpenSpec connects to the deployment spec describes, with a pool sized for
// poolSize concurrent users (at least 10; in a cluster, per node), dial,
// read and write timeouts of 5s, and TLS when the spec says so. It checks
// that Redis answers before returning, so that a wrong setting fails at
// start with a message naming the URL (password redacted) and its
// variable:
//
//   - standalone: PING, and a refusal of a Sentinel or cluster node given
//     as a plain server (it would answer PING, then fail on every key);
//   - Sentinel: the Sentinels name a master, which answers PING;
//   - cluster: every master answers PING and reports cluster_state:ok.
//
// The client is a *redis.Client (standalone), a failover *redis.Client
// (Sentinel) or a *redis.ClusterClient; the caller closes it.
func OpenSpec(ctx context.Context, spec Spec, poolSize int) (redis.UniversalClient, error) {
	c, err := Connect(spec, poolSize)
	if err != nil {
		return nil, err
	}
	checkCtx, cancel := context.WithTimeout(ctx, checkTimeout)
	defer cancel()
	if err := Check(checkCtx, c, spec); err != nil {
		_ = c.Close()
		return nil, err
	}
	return c, nil
}

// Connect is OpenSpec without the check: it builds the client, which
// connects when first used, and fails only on a spec that names no
// deployment. A program that should wait for Redis rather than fail
// (WaitReady) starts here.
func Connect(spec Spec, poolSize int) (redis.UniversalClient, error) {
	if poolSize < 10 {
		poolSize = 10
	}
	fail := func(format string, args ...any) error {
		return fmt.Errorf("redis at %s (%s) %s", spec, spec.source(), fmt.Sprintf(format, args...))
	}
	if len(spec.Addrs) == 0 {
		return nil, fail("has no address")
	}
	var c redis.UniversalClient
	switch spec.Kind() {
	case Sentinel:
		if spec.MasterName == "" {
			return nil, fail("has no master name")
		}
		c = redis.NewFailoverClient(&redis.FailoverOptions{
			MasterName:       spec.MasterName,
			SentinelAddrs:    spec.Addrs,
			SentinelUsername: spec.SentinelUsername,
			SentinelPassword: spec.SentinelPassword,
			Username:         spec.Username,
			Password:         spec.Password,
			DB:               spec.DB,
			DialTimeout:      dialTimeout,
			ReadTimeout:      ioTimeout,
			WriteTimeout:     ioTimeout,
			PoolSize:         poolSize,
			TLSConfig:        spec.tlsConfig(),
		})
	case Cluster:
		if spec.DB != 0 {
			return nil, fail("names database %d, but a cluster has only database 0", spec.DB)
		}
		c = redis.NewClusterClient(&redis.ClusterOptions{
			Addrs:        spec.Addrs,
			Username:     spec.Username,
			Password:     spec.Password,
			DialTimeout:  dialTimeout,
			ReadTimeout:  ioTimeout,
			WriteTimeout: ioTimeout,
			PoolSize:     poolSize,
			TLSConfig:    spec.tlsConfig(),
		})
	default:
		if len(spec.Addrs) != 1 {
			return nil, fail("has %d addresses; a standalone server has one", len(spec.Addrs))
		}
		c = redis.NewClient(&redis.Options{
			Addr:         spec.Addrs[0],
			Username:     spec.Username,
			Password:     spec.Password,
			DB:           spec.DB,
			DialTimeout:  dialTimeout,
			ReadTimeout:  ioTimeout,
			WriteTimeout: ioTimeout,
			PoolSize:     poolSize,
			TLSConfig:    spec.tlsConfig(),
		})
	}
	return c, nil
}

// Check asks the deployment whether it serves, as OpenSpec does; its
// error names the URL and its variable. An error that waiting cannot cure
// (a Sentinel or cluster node given as a plain server) is a
// *MisconfiguredError.
func Check(ctx context.Context, c redis.UniversalClient, spec Spec) error {
	if err := check(ctx, c, spec); err != nil {
		err = fmt.Errorf("redis at %s (%s) %w", spec, spec.source(), err)
		if _, ok := errors.AsType[*MisconfiguredError](err); ok {
			return &MisconfiguredError{err}
		}
		return err
	}
	return nil
}

// MisconfiguredError is a Check error that waiting cannot cure: the
// configuration names the wrong kind of server.
type MisconfiguredError struct{ Err error }

func (e *MisconfiguredError) Error() string { return e.Err.Error() }
func (e *MisconfiguredError) Unwrap() error { return e.Err }

func (s Spec) tlsConfig() *tls.Config {
	if !s.TLS {
		return nil
	}
	// No ServerName: crypto/tls takes it from the address dialled, which
	// differs for each Sentinel and cluster node.
	return &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: s.InsecureSkipVerify} //nolint:gosec // only when asked, for tests
}

// check returns an error that completes "redis at <url> (<var>) …".
func check(ctx context.Context, c redis.UniversalClient, spec Spec) error {
	switch spec.Kind() {
	case Cluster:
		cc := c.(*redis.ClusterClient)
		var masters atomic.Int32
		err := cc.ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error {
			masters.Add(1)
			if err := m.Ping(ctx).Err(); err != nil {
				return fmt.Errorf("master %s: %w", m.Options().Addr, err)
			}
			info, err := m.ClusterInfo(ctx).Result()
			if err != nil {
				return nil // CLUSTER INFO may be forbidden; PING is enough
			}
			if st := infoField(info, "cluster_state"); st != "" && st != "ok" {
				return fmt.Errorf("master %s reports cluster_state:%s", m.Options().Addr, st)
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("does not answer as a cluster: %w", err)
		}
		if masters.Load() == 0 {
			return errors.New("has no master serving hash slots: is the cluster created?")
		}
		return nil
	case Sentinel:
		// Asking the Sentinels first gives a clear error, at once, when
		// none answers or none knows the master name.
		master, err := askSentinels(ctx, spec)
		if err != nil {
			return fmt.Errorf("does not answer: %w", err)
		}
		if err := c.Ping(ctx).Err(); err != nil {
			return fmt.Errorf("does not answer: master %q at %s: %w", spec.MasterName, master, err)
		}
		return nil
	default:
		if err := c.Ping(ctx).Err(); err != nil {
			return fmt.Errorf("does not answer: %w", err)
		}
		info, err := c.Info(ctx, "server").Result()
		if err != nil {
			return nil // INFO may be forbidden; PING is enough
		}
		switch infoField(info, "redis_mode") {
		case "sentinel":
			return &MisconfiguredError{fmt.Errorf("is a Sentinel, not a Redis server: use redis-sentinel://%s/<master-name> with every Sentinel's address", spec.Addrs[0])}
		case "cluster":
			return &MisconfiguredError{fmt.Errorf("is a Redis Cluster node: use redis-cluster://%s,… with some of the nodes' addresses", spec.Addrs[0])}
		}
		return nil
	}
}

// askSentinels returns the master's address from the first Sentinel that
// names it, or an error listing what each Sentinel said.
func askSentinels(ctx context.Context, spec Spec) (string, error) {
	var errs []string
	for _, addr := range spec.Addrs {
		sc := redis.NewSentinelClient(&redis.Options{
			Addr: addr, Username: spec.SentinelUsername, Password: spec.SentinelPassword,
			DialTimeout: dialTimeout, ReadTimeout: ioTimeout, WriteTimeout: ioTimeout,
			TLSConfig: spec.tlsConfig(), MaxRetries: -1, DialerRetries: 1,
		})
		hp, err := sc.GetMasterAddrByName(ctx, spec.MasterName).Result()
		_ = sc.Close()
		switch {
		case errors.Is(err, redis.Nil):
			errs = append(errs, fmt.Sprintf("%s does not know master %q", addr, spec.MasterName))
		case err != nil:
			errs = append(errs, fmt.Sprintf("%s: %v", addr, err))
		case len(hp) == 2:
			return net.JoinHostPort(hp[0], hp[1]), nil
		}
	}
	return "", fmt.Errorf("no Sentinel names master %q: %s", spec.MasterName, strings.Join(errs, "; "))
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
