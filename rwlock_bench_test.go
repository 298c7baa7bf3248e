package redlatch_test

import (
	"context"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// BenchmarkRWMutexMixed: one RWMutex, 16 goroutines over 2 Clients, each
// operation a read (95%) or a write (5%) with an empty critical section, for
// 1 second per iteration. Reports operations/s, the writers' wait (Lock call
// to acquisition) p99 and max, and the readers' wait p99. Runs on the real
// single redis-server when there is one, else on miniredis.
//
//	go test -run '^$' -bench RWMutexMixed -benchtime 1x .
func BenchmarkRWMutexMixed(b *testing.B) {
	be := benchBackend(b)
	for b.Loop() {
		rwMixed(b, be)
	}
}

func rwMixed(b *testing.B, be redistest.Backend) {
	const goroutines, clients, writePct = 16, 2, 5
	duration := time.Second
	ctx := context.Background()
	name := redistest.UniqueName(b)
	cs := make([]*redlatch.Client, clients)
	for i := range cs {
		cs[i] = redlatch.New(be.Client(b))
	}
	defer func() {
		for _, c := range cs {
			_ = c.Close()
		}
	}()

	var (
		mu                 sync.Mutex
		readWaits, wrWaits []time.Duration
		wg                 sync.WaitGroup
		deadline           = time.Now().Add(duration)
		start              = time.Now()
	)
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			m := cs[g%clients].RWMutex(name)
			var rw, ww []time.Duration
			defer func() {
				mu.Lock()
				readWaits, wrWaits = append(readWaits, rw...), append(wrWaits, ww...)
				mu.Unlock()
			}()
			for time.Now().Before(deadline) {
				t0 := time.Now()
				if rand.N(100) < writePct {
					if err := m.Lock(ctx); err != nil {
						b.Error(err)
						return
					}
					ww = append(ww, time.Since(t0))
					if err := m.Unlock(ctx); err != nil {
						b.Error(err)
						return
					}
					continue
				}
				if err := m.RLock(ctx); err != nil {
					b.Error(err)
					return
				}
				rw = append(rw, time.Since(t0))
				if err := m.RUnlock(ctx); err != nil {
					b.Error(err)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	elapsed := time.Since(start)

	slices.Sort(readWaits)
	slices.Sort(wrWaits)
	pct := func(d []time.Duration, p float64) float64 {
		if len(d) == 0 {
			return 0
		}
		return float64(d[min(len(d)-1, int(p*float64(len(d))))].Microseconds()) / 1000
	}
	b.ReportMetric(float64(len(readWaits)+len(wrWaits))/elapsed.Seconds(), "ops/s")
	b.ReportMetric(float64(len(wrWaits)), "writes")
	b.ReportMetric(pct(wrWaits, 0.99), "write-wait-p99-ms")
	b.ReportMetric(pct(wrWaits, 1), "write-wait-max-ms")
	b.ReportMetric(pct(readWaits, 0.99), "read-wait-p99-ms")
}
