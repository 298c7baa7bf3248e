package main

import (
	"context"
	"log"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/rueidis"
)

// requestCounter is a go-redis hook that counts the requests a client sends:
// one command, or one whole pipeline, counts once (one round trip).
// Subscriber connections bypass hooks; their SUBSCRIBE/UNSUBSCRIBE come
// from INFO commandstats instead (see snapshot.subs).
type requestCounter struct{ n *atomic.Int64 }

func (h requestCounter) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h requestCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if !isHandshake(cmd) {
			h.n.Add(1)
		}
		return next(ctx, cmd)
	}
}

func (h requestCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if slices.ContainsFunc(cmds, func(c redis.Cmder) bool { return !isHandshake(c) }) {
			h.n.Add(1)
		}
		return next(ctx, cmds)
	}
}

// isHandshake reports whether cmd is part of the handshake go-redis runs on
// each new connection (through the client's hooks): HELLO, AUTH, CLIENT
// SETINFO/SETNAME/MAINT_NOTIFICATIONS. They are connection setup, not lock
// traffic (rueidis's handshake does not pass countingRueidis either).
func isHandshake(cmd redis.Cmder) bool {
	switch cmd.Name() {
	case "hello", "auth":
		return true
	case "client":
		args := cmd.Args()
		if len(args) > 1 {
			sub, _ := args[1].(string)
			switch strings.ToLower(sub) {
			case "setinfo", "setname", "maint_notifications":
				return true
			}
		}
	}
	return false
}

// countingRueidis wraps a rueidis.Client and counts its requests the same
// way: each Do, DoMulti (a pipeline), DoCache, DoStream … counts once.
// rueidislock builds its client through LockerOption.ClientBuilder, which
// returns this wrapper, so every lock script it runs passes here. Server
// pushes (client-side-caching invalidations that wake its waiters) are not
// requests and are not counted.
type countingRueidis struct {
	rueidis.Client
	n *atomic.Int64
}

func (c countingRueidis) Do(ctx context.Context, cmd rueidis.Completed) rueidis.RedisResult {
	c.n.Add(1)
	return c.Client.Do(ctx, cmd)
}

func (c countingRueidis) DoMulti(ctx context.Context, multi ...rueidis.Completed) []rueidis.RedisResult {
	c.n.Add(1)
	return c.Client.DoMulti(ctx, multi...)
}

func (c countingRueidis) DoCache(ctx context.Context, cmd rueidis.Cacheable, ttl time.Duration) rueidis.RedisResult {
	c.n.Add(1)
	return c.Client.DoCache(ctx, cmd, ttl)
}

func (c countingRueidis) DoMultiCache(ctx context.Context, multi ...rueidis.CacheableTTL) []rueidis.RedisResult {
	c.n.Add(1)
	return c.Client.DoMultiCache(ctx, multi...)
}

func (c countingRueidis) DoStream(ctx context.Context, cmd rueidis.Completed) rueidis.RedisResultStream {
	c.n.Add(1)
	return c.Client.DoStream(ctx, cmd)
}

func (c countingRueidis) DoMultiStream(ctx context.Context, multi ...rueidis.Completed) rueidis.MultiRedisResultStream {
	c.n.Add(1)
	return c.Client.DoMultiStream(ctx, multi...)
}

func (c countingRueidis) Receive(ctx context.Context, subscribe rueidis.Completed, fn func(msg rueidis.PubSubMessage)) error {
	c.n.Add(1)
	return c.Client.Receive(ctx, subscribe, fn)
}

// snapshot is what INFO cpu and INFO commandstats say at one moment.
type snapshot struct {
	cpu   float64            // used_cpu_user + used_cpu_sys, seconds
	calls map[string]float64 // command (lower case) -> calls
	bad   bool               // INFO failed: the figures from it are unknown
}

func takeSnapshot(rdb *redis.Client) snapshot {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s := snapshot{calls: map[string]float64{}}
	text, err := rdb.Info(ctx, "cpu", "commandstats").Result()
	if err != nil {
		log.Printf("INFO cpu commandstats: %v (the Redis CPU and command figures of this run are left out)", err)
		s.bad = true
	}
	for _, line := range strings.Split(text, "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok {
			continue
		}
		if name, ok := strings.CutPrefix(k, "cmdstat_"); ok {
			_, rest, _ := strings.Cut(v, "calls=")
			n, _ := strconv.ParseFloat(strings.SplitN(rest, ",", 2)[0], 64)
			s.calls[name] = n
			continue
		}
		if k == "used_cpu_user" || k == "used_cpu_sys" {
			f, _ := strconv.ParseFloat(v, 64)
			s.cpu += f
		}
	}
	return s
}

// delta is the difference of two snapshots.
type delta struct {
	cpu     float64 // seconds of Redis CPU
	cmds    float64 // commands executed, those run inside scripts included; INFO excluded
	scripts float64 // EVAL, EVALSHA, FCALL …
	subs    float64 // SUBSCRIBE/UNSUBSCRIBE and their sharded and pattern forms
	bad     bool    // a snapshot failed: all of the above are unknown
}

func (a snapshot) to(b snapshot) delta {
	d := delta{cpu: b.cpu - a.cpu, bad: a.bad || b.bad}
	for name, n := range b.calls {
		x := n - a.calls[name]
		switch name {
		case "info":
			continue
		case "subscribe", "unsubscribe", "ssubscribe", "sunsubscribe", "psubscribe", "punsubscribe":
			d.subs += x
		case "eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro":
			d.scripts += x
		}
		d.cmds += x
	}
	return d
}

func (d *delta) add(e delta) {
	d.cpu += e.cpu
	d.cmds += e.cmds
	d.scripts += e.scripts
	d.subs += e.subs
	d.bad = d.bad || e.bad
}

// per returns x/n, or nil (null in results.json, "–" in the table) when a
// snapshot of d failed.
func (d delta) per(x, n float64) *float64 {
	if d.bad {
		return nil
	}
	return num(x / n)
}

// percentile returns the p-quantile (0..1) of sorted durations, in µs.
func percentile(sorted []time.Duration, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p*float64(len(sorted)))) - 1
	i = max(0, min(len(sorted)-1, i))
	return float64(sorted[i].Nanoseconds()) / 1e3
}

func sortedCopy(d []time.Duration) []time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s
}

// jain is Jain's fairness index of per-owner counts: 1 when all got the
// same share, 1/n when one got everything.
func jain(counts []int) float64 {
	var sum, sumSq float64
	for _, c := range counts {
		sum += float64(c)
		sumSq += float64(c) * float64(c)
	}
	if sumSq == 0 {
		return 0
	}
	return sum * sum / (float64(len(counts)) * sumSq)
}
