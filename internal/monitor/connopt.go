package monitor

import (
	"crypto/tls"
	"time"

	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/redisconn"
)

// Timeouts of asynqmon's connections, as redisconn.OpenSpec sets them.
const (
	dialTimeout = 5 * time.Second
	ioTimeout   = 5 * time.Second
)

// ConnOpt is the asynq.RedisConnOpt of the deployment spec describes, for
// asynqmon, which opens its own connections: a RedisClientOpt
// (standalone), a RedisFailoverClientOpt (Sentinel) or a
// RedisClusterClientOpt (cluster), with the same credentials, database and
// TLS settings as redisconn.OpenSpec uses.
func ConnOpt(spec redisconn.Spec) asynq.RedisConnOpt {
	var tlsConfig *tls.Config
	if spec.TLS {
		// No ServerName: crypto/tls takes it from each address dialled.
		tlsConfig = &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: spec.InsecureSkipVerify} //nolint:gosec // only when the URL asks, for tests
	}
	switch spec.Kind() {
	case redisconn.Sentinel:
		return asynq.RedisFailoverClientOpt{
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
			TLSConfig:        tlsConfig,
		}
	case redisconn.Cluster:
		return asynq.RedisClusterClientOpt{
			Addrs:        spec.Addrs,
			Username:     spec.Username,
			Password:     spec.Password,
			DialTimeout:  dialTimeout,
			ReadTimeout:  ioTimeout,
			WriteTimeout: ioTimeout,
			TLSConfig:    tlsConfig,
		}
	default:
		addr := redisconn.DefaultAddr
		if len(spec.Addrs) > 0 {
			addr = spec.Addrs[0]
		}
		return asynq.RedisClientOpt{
			Addr:         addr,
			Username:     spec.Username,
			Password:     spec.Password,
			DB:           spec.DB,
			DialTimeout:  dialTimeout,
			ReadTimeout:  ioTimeout,
			WriteTimeout: ioTimeout,
			TLSConfig:    tlsConfig,
		}
	}
}
