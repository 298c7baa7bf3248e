package redistest

import (
	"context"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/redis/go-redis/v9"
)

// RequestCounter is a go-redis hook that counts the requests a client sends:
// a command, or a whole pipeline, counts once (one round trip).
type RequestCounter struct{ N atomic.Int64 }

func (h *RequestCounter) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *RequestCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error { h.N.Add(1); return next(ctx, cmd) }
}

func (h *RequestCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error { h.N.Add(1); return next(ctx, cmds) }
}

// InfoStats returns the numeric fields of one node's INFO cpu and
// commandstats: "used_cpu_user" and "used_cpu_sys" in seconds, and
// "cmdstat_<command>.calls" as counts.
func InfoStats(rdb redis.UniversalClient) map[string]float64 {
	out := map[string]float64{}
	s, _ := rdb.Info(context.Background(), "cpu", "commandstats").Result()
	for _, line := range strings.Split(s, "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok {
			continue
		}
		if strings.HasPrefix(k, "cmdstat_") {
			_, rest, _ := strings.Cut(v, "calls=")
			n, _ := strconv.ParseFloat(strings.SplitN(rest, ",", 2)[0], 64)
			out[k+".calls"] = n
			continue
		}
		if f, err := strconv.ParseFloat(v, 64); err == nil {
			out[k] = f
		}
	}
	return out
}
