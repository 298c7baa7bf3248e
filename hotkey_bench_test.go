package redlatch_test

import (
	"context"
	"math/rand/v2"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

type lockUnlock struct {
	lock   func(ctx context.Context) error
	unlock func(ctx context.Context) error
}

// pollingLock is the classic polling lock: SET NX PX, retried after a sleep
// drawn from [minSleep, maxSleep], released by compare-and-delete.
func pollingLock(rdb redis.UniversalClient, key string, minSleep, maxSleep time.Duration) lockUnlock {
	owner := strconv.FormatUint(rand.Uint64(), 36)
	return lockUnlock{
		lock: func(ctx context.Context) error {
			for {
				ok, err := rdb.SetNX(ctx, key, owner, 30*time.Second).Result()
				if err != nil || ok {
					return err
				}
				d := minSleep
				if maxSleep > minSleep {
					d += rand.N(maxSleep - minSleep)
				}
				time.Sleep(d)
			}
		},
		unlock: func(ctx context.Context) error {
			return casDelete.Run(ctx, rdb, []string{key}, owner).Err()
		},
	}
}

// BenchmarkHotKey: one hot key, 16 goroutines over 2 Clients, empty
// critical section, for 2 seconds per lock kind. Reports acquisitions/s,
// handoff latency p50/p99 to a different owner, wait p99/max from the Lock
// call to acquisition, Jain's fairness index over per-goroutine counts,
// round trips per acquisition (requests sent, counted with a go-redis hook,
// plus SUBSCRIBE/UNSUBSCRIBE from INFO commandstats) and Redis CPU µs per
// acquisition (INFO cpu delta). Needs a real redis-server.
//
//	go test -run '^$' -bench HotKey -benchtime 1x .
func BenchmarkHotKey(b *testing.B) {
	be := benchBackend(b)
	if !be.Real() {
		b.Skip("needs a real redis-server for INFO cpu and commandstats")
	}
	kinds := []struct {
		name string
		make func(c *redlatch.Client, rdb redis.UniversalClient, key string) lockUnlock
	}{
		{"Mutex", func(c *redlatch.Client, _ redis.UniversalClient, key string) lockUnlock {
			m := c.Mutex(key)
			return lockUnlock{m.Lock, m.Unlock}
		}},
		{"ReentrantMutex", func(c *redlatch.Client, _ redis.UniversalClient, key string) lockUnlock {
			m := c.ReentrantMutex(key)
			return lockUnlock{m.Lock, m.Unlock}
		}},
		{"Poll1ms", func(_ *redlatch.Client, rdb redis.UniversalClient, key string) lockUnlock {
			return pollingLock(rdb, key, time.Millisecond, time.Millisecond)
		}},
		{"Poll50to250ms", func(_ *redlatch.Client, rdb redis.UniversalClient, key string) lockUnlock {
			return pollingLock(rdb, key, 50*time.Millisecond, 250*time.Millisecond)
		}},
	}
	for _, k := range kinds {
		b.Run(k.name, func(b *testing.B) {
			for b.Loop() {
				hotKey(b, be, k.make)
			}
		})
	}
}

func hotKey(b *testing.B, be redistest.Backend, mk func(*redlatch.Client, redis.UniversalClient, string) lockUnlock) {
	const goroutines, clients = 16, 2
	duration := 2 * time.Second
	ctx := context.Background()
	key := redistest.UniqueName(b)
	hooks := make([]*redistest.RequestCounter, clients)
	rdbs := make([]redis.UniversalClient, clients)
	cs := make([]*redlatch.Client, clients)
	for i := range cs {
		hooks[i] = &redistest.RequestCounter{}
		rdbs[i] = be.Client(b)
		rdbs[i].AddHook(hooks[i])
		cs[i] = redlatch.New(rdbs[i])
	}
	defer func() {
		for _, c := range cs {
			_ = c.Close()
		}
	}()
	stats := be.Client(b)

	type rec struct {
		g        int
		acq, rel time.Time
	}
	var (
		mu     sync.Mutex
		recs   []rec
		waits  []time.Duration
		counts = make([]int, goroutines)
	)
	before := redistest.InfoStats(stats)
	for _, h := range hooks {
		h.N.Store(0)
	}
	start := time.Now()
	deadline := start.Add(duration)
	var wg sync.WaitGroup
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			l := mk(cs[g%clients], rdbs[g%clients], key)
			for time.Now().Before(deadline) {
				t0 := time.Now()
				if err := l.lock(ctx); err != nil {
					b.Error(err)
					return
				}
				acq := time.Now()
				rel := time.Now()
				mu.Lock()
				recs = append(recs, rec{g, acq, rel})
				waits = append(waits, acq.Sub(t0))
				counts[g]++
				mu.Unlock()
				if err := l.unlock(ctx); err != nil {
					b.Error(err)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	elapsed := time.Since(start)
	after := redistest.InfoStats(stats)

	n := float64(len(recs))
	var handoffs []time.Duration
	for i := 1; i < len(recs); i++ {
		if recs[i].g != recs[i-1].g {
			handoffs = append(handoffs, recs[i].acq.Sub(recs[i-1].rel))
		}
	}
	slices.Sort(handoffs)
	slices.Sort(waits)
	pct := func(d []time.Duration, p float64) float64 {
		if len(d) == 0 {
			return 0
		}
		return float64(d[min(len(d)-1, int(p*float64(len(d))))].Microseconds())
	}
	var sum, sumSq float64
	for _, c := range counts {
		sum += float64(c)
		sumSq += float64(c) * float64(c)
	}
	var rt int64
	for _, h := range hooks {
		rt += h.N.Load()
	}
	subs := 0.0
	for _, k := range []string{"subscribe", "unsubscribe", "ssubscribe", "sunsubscribe"} {
		subs += after["cmdstat_"+k+".calls"] - before["cmdstat_"+k+".calls"]
	}
	cpu := (after["used_cpu_user"] + after["used_cpu_sys"]) - (before["used_cpu_user"] + before["used_cpu_sys"])
	b.ReportMetric(n/elapsed.Seconds(), "acq/s")
	b.ReportMetric(pct(handoffs, 0.5), "handoff-p50-µs")
	b.ReportMetric(pct(handoffs, 0.99), "handoff-p99-µs")
	b.ReportMetric(pct(waits, 0.99)/1000, "wait-p99-ms")
	b.ReportMetric(pct(waits, 1)/1000, "wait-max-ms")
	b.ReportMetric(sum*sum/(float64(goroutines)*sumSq), "jain")
	b.ReportMetric((float64(rt)+subs)/n, "rt/acq")
	b.ReportMetric(cpu*1e6/n, "redis-cpu-µs/acq")
}
