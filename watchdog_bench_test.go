package redlatch

import (
	"context"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/redlatch/redlatch/internal/redistest"
)

type requestCounter struct{ n atomic.Int64 }

func (h *requestCounter) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *requestCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error { h.n.Add(1); return next(ctx, cmd) }
}
func (h *requestCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error { h.n.Add(1); return next(ctx, cmds) }
}

// serverStats returns EVALSHA+EVAL calls and used CPU seconds of a server.
func serverStats(rdb redis.UniversalClient) (calls, cpu float64) {
	s, _ := rdb.Info(context.Background(), "cpu", "commandstats").Result()
	for _, line := range strings.Split(s, "\n") {
		k, v, _ := strings.Cut(strings.TrimSpace(line), ":")
		switch {
		case k == "cmdstat_evalsha" || k == "cmdstat_eval":
			_, rest, _ := strings.Cut(v, "calls=")
			n, _ := strconv.ParseFloat(strings.SplitN(rest, ",", 2)[0], 64)
			calls += n
		case k == "used_cpu_user" || k == "used_cpu_sys":
			f, _ := strconv.ParseFloat(v, 64)
			cpu += f
		}
	}
	return calls, cpu
}

// BenchmarkRenewal10k measures one watchdog renewal period with 10,000 held
// locks: round trips, script calls, Redis CPU and client time per period
// (ns/op is the client's wall time for the period's renewal).
//
//	go test -run '^$' -bench Renewal10k -benchtime 20x .
func BenchmarkRenewal10k(b *testing.B) {
	var be redistest.Backend
	for _, x := range redistest.Backends(b) {
		if x.Name == "redis" {
			be = x
		}
	}
	if be.Server == nil {
		b.Skip("needs a real redis-server")
	}
	ctx := context.Background()
	rdb := be.Server.Client(b)
	counter := &requestCounter{}
	rdb.AddHook(counter)
	c := New(rdb, WithWatchdogTimeout(time.Hour)) // the ticker stays out of the way
	defer c.Close()
	base := redistest.UniqueName(b)
	pipe := rdb.Pipeline()
	for i := 0; i < 10000; i++ {
		m := c.Mutex(base + "-" + strconv.Itoa(i))
		e := m.e
		// Take the locks in one pipeline; then track them as Lock would.
		lockScript.Eval(ctx, pipe, []string{e.key, e.fence}, e.owner, e.lease.Milliseconds(), newID(), "0", fenceRetention(e.lease))
		e.track(time.Now())
	}
	if _, err := pipe.Exec(ctx); err != nil {
		b.Fatal(err)
	}
	stats := be.Server.Client(b)
	calls0, cpu0 := serverStats(stats)
	counter.n.Store(0)
	b.ResetTimer()
	for b.Loop() {
		c.wd.renewAll()
	}
	b.StopTimer()
	calls1, cpu1 := serverStats(stats)
	n := float64(b.N)
	b.ReportMetric(float64(counter.n.Load())/n, "round-trips/period")
	b.ReportMetric((calls1-calls0)/n, "script-calls/period")
	b.ReportMetric((cpu1-cpu0)*1e3/n, "redis-cpu-ms/period")
	c.wd.mu.Lock()
	lost := 10000 - len(c.wd.holds)
	c.wd.mu.Unlock()
	if lost != 0 {
		b.Fatalf("%d holds lost during renewal", lost)
	}
}
