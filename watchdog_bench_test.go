package redlatch

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/redlatch/redlatch/internal/redistest"
)

// scriptStats returns EVALSHA+EVAL calls and used CPU seconds of a server.
func scriptStats(rdb redis.UniversalClient) (calls, cpu float64) {
	st := redistest.InfoStats(rdb)
	return st["cmdstat_evalsha.calls"] + st["cmdstat_eval.calls"], st["used_cpu_user"] + st["used_cpu_sys"]
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
	counter := &redistest.RequestCounter{}
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
		e.track(time.Now(), 0)
	}
	if _, err := pipe.Exec(ctx); err != nil {
		b.Fatal(err)
	}
	stats := be.Server.Client(b)
	calls0, cpu0 := scriptStats(stats)
	counter.N.Store(0)
	b.ResetTimer()
	for b.Loop() {
		c.wd.renewAll()
	}
	b.StopTimer()
	calls1, cpu1 := scriptStats(stats)
	n := float64(b.N)
	b.ReportMetric(float64(counter.N.Load())/n, "round-trips/period")
	b.ReportMetric((calls1-calls0)/n, "script-calls/period")
	b.ReportMetric((cpu1-cpu0)*1e3/n, "redis-cpu-ms/period")
	c.wd.mu.Lock()
	lost := 10000 - len(c.wd.holds)
	c.wd.mu.Unlock()
	if lost != 0 {
		b.Fatalf("%d holds lost during renewal", lost)
	}
}
