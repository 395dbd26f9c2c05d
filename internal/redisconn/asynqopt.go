package redisconn

import "github.com/hibiken/asynq"

// AsynqConnOpt is the asynq.RedisConnOpt of the deployment the spec
// describes, for code that opens its own connections (asynqmon): a
// RedisClientOpt, RedisFailoverClientOpt or RedisClusterClientOpt with the
// credentials, database, timeouts and TLS settings OpenSpec uses.
func (spec Spec) AsynqConnOpt() asynq.RedisConnOpt {
	tlsConfig := spec.tlsConfig()
	switch spec.Kind() {
	case Sentinel:
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
	case Cluster:
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
		addr := DefaultAddr
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
