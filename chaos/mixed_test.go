package chaos_test

import (
	"context"
	"testing"
	"time"

	"github.com/redlatch/redlatch/chaos"
)

// mixedFaults runs four in-process workers of kind, two of them through
// their own proxies, through a round of faults: latency under the lease on
// one link, a blackhole and a reset on the other, CLIENT KILL TYPE pubsub,
// the server paused past the lease, and a restart without persistence.
func mixedFaults(t *testing.T, kind string) {
	s := newServer(t)
	const lease = time.Second
	p1, p2 := newProxy(t, s.Addr), newProxy(t, s.Addr)
	admin := rdbOf(t, s.Addr)
	rounds := int(scale(time.Second) / time.Second)
	step := 700 * time.Millisecond
	faults := []struct {
		name    string
		on, off func() error
	}{
		{"latency 80ms on link 1", func() error {
			return p1.AddToxic("lat", "latency", "downstream", map[string]any{"latency": 80, "jitter": 40})
		}, func() error { return p1.RemoveToxic("lat") }},
		{"blackhole on link 2", func() error {
			return p2.AddToxic("hole", "timeout", "upstream", map[string]any{"timeout": 0})
		}, func() error { return p2.RemoveToxic("hole") }},
		{"reset on link 2", func() error {
			return p2.AddToxic("reset", "reset_peer", "downstream", map[string]any{"timeout": 0})
		}, func() error { return p2.RemoveToxic("reset") }},
		{"CLIENT KILL TYPE pubsub", func() error {
			return admin.Do(context.Background(), "CLIENT", "KILL", "TYPE", "pubsub").Err()
		}, func() error { return nil }},
		{"server paused past the lease", func() error {
			if err := s.Stop(); err != nil {
				return err
			}
			time.Sleep(lease + 500*time.Millisecond)
			return s.Cont()
		}, func() error { return nil }},
		{"restart without persistence", s.Restart, func() error { return nil }},
	}
	// The workers outlast the faults: each takes two steps, the pause its
	// lease and 500 ms more, and a step after the restart shows recovery.
	d := time.Duration(rounds)*(time.Duration(len(faults))*2*step+lease+500*time.Millisecond) + 2*step
	cfgs := workers(4, s.Addr, kind, lease, d)
	cfgs[0].Addr, cfgs[1].Addr = p1.Addr, p2.Addr
	cfgs[1].Timeout = 500 * time.Millisecond
	c := chaos.NewCoord()
	wait := runLocal(t, c, cfgs...)
	var onAt []struct {
		name string
		at   int64
	}
	for r := 0; r < rounds; r++ {
		for _, f := range faults {
			time.Sleep(step)
			onAt = append(onAt, struct {
				name string
				at   int64
			}{f.name, chaos.Mono()})
			if err := f.on(); err != nil {
				t.Fatalf("%s: %v", f.name, err)
			}
			time.Sleep(step)
			if err := f.off(); err != nil {
				t.Fatalf("%s: %v", f.name, err)
			}
		}
	}
	wait()
	size := 1
	if kind == "semaphore" {
		size = chaos.SemaphoreSize
	}
	holds := checkAllSize(t, c, size)
	// Each fault must hit the workers: some hold is acquired after it began.
	var last int64
	for _, h := range holds {
		last = max(last, h.Acq)
	}
	for _, f := range onAt {
		if f.at >= last {
			t.Errorf("fault %q began %v after the last acquisition: the workers never met it",
				f.name, time.Duration(f.at-last))
		}
	}
	// A permit set holding only remembered releases (kept a minute after
	// its last permit, README "Lost replies") counts as empty: see noPermits.
	nothingLeft(t, s.Addr, lease+slack)
}

func TestMutexUnderMixedFaults(t *testing.T)          { mixedFaults(t, "mutex") }
func TestReentrantMutexUnderMixedFaults(t *testing.T) { mixedFaults(t, "reentrant") }
func TestFairMutexUnderMixedFaults(t *testing.T)      { mixedFaults(t, "fair") }
func TestRWMutexUnderMixedFaults(t *testing.T)        { mixedFaults(t, "rwmutex") }
func TestRWMutexReadersUnderMixedFaults(t *testing.T) { mixedFaults(t, "rwmixed") }
func TestSemaphoreUnderMixedFaults(t *testing.T)      { mixedFaults(t, "semaphore") }
