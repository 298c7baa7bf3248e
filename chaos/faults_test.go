package chaos_test

import (
	"context"
	"testing"
	"time"

	"github.com/redlatch/redlatch/chaos"
)

// workers returns n in-process worker configs on addr, named w1…wn.
func workers(n int, addr, kind string, watchdog, d time.Duration) []chaos.WorkerConfig {
	var cfgs []chaos.WorkerConfig
	for i := 1; i <= n; i++ {
		cfgs = append(cfgs, chaos.WorkerConfig{
			Name: "w" + string(rune('0'+i)), Addr: addr, Lock: "faults", Kind: kind,
			Watchdog: watchdog, Duration: d,
			HoldMax: 20 * time.Millisecond, GapMax: 20 * time.Millisecond,
		})
	}
	return cfgs
}

// Latency under the lease between one client and Redis: nothing is lost,
// the history is linearizable.
func TestLatencyUnderLease(t *testing.T) {
	s := newServer(t)
	p := newProxy(t, s.Addr)
	if err := p.AddToxic("slow", "latency", "downstream", map[string]any{"latency": 60, "jitter": 30}); err != nil {
		t.Fatal(err)
	}
	c := chaos.NewCoord()
	cfgs := workers(3, s.Addr, "mutex", time.Second, scale(4*time.Second))
	cfgs[0].Addr = p.Addr
	runLocal(t, c, cfgs...)()
	for _, h := range checkAll(t, c) {
		if h.Lost {
			t.Errorf("hold lost with latency under the lease: %+v", h)
		}
	}
	nothingLeft(t, s.Addr, time.Second+slack)
}

// Latency over the lease between one client and Redis: every hold of that
// client is reported lost (its lease has ended when the reply arrives),
// fencing rejects its stale operations, the others go on.
func TestLatencyOverLease(t *testing.T) {
	s := newServer(t)
	p := newProxy(t, s.Addr)
	const lease = 500 * time.Millisecond
	if err := p.AddToxic("slow", "latency", "downstream", map[string]any{"latency": 800}); err != nil {
		t.Fatal(err)
	}
	c := chaos.NewCoord()
	// Each attempt of the slow client takes 800 ms to answer: give it time
	// for several, so that one of them finds the lock free.
	cfgs := workers(3, s.Addr, "mutex", lease, scale(8*time.Second))
	cfgs[0].Addr = p.Addr
	for i := range cfgs[1:] {
		cfgs[1+i].GapMax = 300 * time.Millisecond // leave the slow client a chance
	}
	runLocal(t, c, cfgs...)()
	slow := 0
	for _, h := range checkAll(t, c) {
		if h.Worker == "w1" {
			slow++
			if !h.LostSeen {
				t.Errorf("a hold acquired with a reply later than its lease did not report Lost: %+v", h)
			}
		}
	}
	if slow == 0 {
		t.Error("the slow client never acquired")
	}
	t.Logf("the slow client acquired %d times, each reported lost", slow)
	nothingLeft(t, s.Addr, lease+slack)
}

// A blackhole between a holder and Redis: its renewals vanish, its Lost
// closes within the lease, another client takes over within the lease plus
// slack, and the holder recovers when the network does.
func TestBlackholeBetweenClientAndRedis(t *testing.T) {
	s := newServer(t)
	p := newProxy(t, s.Addr)
	const lease = time.Second
	c := chaos.NewCoord()
	victim := workers(1, p.Addr, "mutex", lease, time.Minute)[0]
	// Two holds: the first is cut off, the second, on the same Client after
	// the network is back, shows that this client recovers.
	victim.Name, victim.Ops = "victim", 2
	victim.HoldMin, victim.HoldMax, victim.LostGrace = 2*lease, 2*lease, lease
	victim.Timeout = 300 * time.Millisecond
	waitVictim := runLocal(t, c, victim)
	acq, ok := c.WaitEvent(10*time.Second, func(e chaos.Event) bool { return e.Worker == "victim" && e.Kind == "acquired" })
	if !ok {
		t.Fatal("victim did not acquire")
	}
	if err := p.AddToxic("hole", "timeout", "upstream", map[string]any{"timeout": 0}); err != nil {
		t.Fatal(err)
	}
	holeAt := chaos.Mono()
	waitOthers := runLocal(t, c, workers(2, s.Addr, "mutex", lease, scale(3*time.Second))...)
	next, ok := c.WaitEvent(lease+slack+5*time.Second, func(e chaos.Event) bool { return e.Kind == "acquired" && e.Worker != "victim" })
	if !ok {
		t.Fatal("nobody took over")
	}
	if d := time.Duration(next.At - holeAt); d > lease+slack {
		t.Errorf("liveness: taken over %v after the blackhole; bound %v + %v", d, lease, slack)
	}
	if d := time.Duration(next.At - acq.Call); d < lease-10*time.Millisecond {
		t.Errorf("mutual exclusion: taken over %v after the victim called Lock, within its lease %v", d, lease)
	}
	time.Sleep(2 * lease)
	if err := p.RemoveToxic("hole"); err != nil {
		t.Fatal(err)
	}
	waitVictim()
	waitOthers()
	recovered := false
	for _, h := range checkAll(t, c) {
		switch h.ID {
		case "victim-0":
			if !h.LostSeen || h.WroteOK {
				t.Errorf("blackholed holder: Lost closed %v, write accepted %v", h.LostSeen, h.WroteOK)
			}
		case "victim-1": // the victim's own Client, after the blackhole
			recovered = h.Acked()
		}
	}
	if !recovered {
		t.Error("the client did not recover after the blackhole")
	}
	nothingLeft(t, s.Addr, lease+slack)
}

// The server paused (SIGSTOP) past the lease, then resumed, while three
// clients contend.
func TestServerPausedPastLease(t *testing.T) {
	s := newServer(t)
	const lease = time.Second
	c := chaos.NewCoord()
	wait := runLocal(t, c, workers(3, s.Addr, "mutex", lease, scale(5*time.Second))...)
	var pauses [][2]int64 // [before SIGSTOP, once the server is stopped]
	for i := 0; i < int(scale(time.Second)/time.Second); i++ {
		time.Sleep(time.Second)
		before := chaos.Mono()
		if err := s.Stop(); err != nil {
			t.Fatal(err)
		}
		pauses = append(pauses, [2]int64{before, chaos.Mono()})
		time.Sleep(2 * lease)
		if err := s.Cont(); err != nil {
			t.Fatal(err)
		}
		resumed := chaos.Mono()
		if _, ok := c.WaitEvent(lease+slack, func(e chaos.Event) bool { return e.Kind == "acquired" && e.At > resumed }); !ok {
			t.Errorf("liveness: no acquisition within %v after the server resumed", lease+slack)
		}
	}
	wait()
	checkLostAcross(t, checkAll(t, c), pauses)
	nothingLeft(t, s.Addr, lease+slack)
}

// checkLostAcross checks that every hold in force when the server stopped
// reports a loss: acquired before the SIGSTOP, its Unlock called once the
// server was stopped, so served only after the 2-lease pause, when its hold
// had expired (its last renewal came before the pause).
func checkLostAcross(t *testing.T, holds []chaos.Hold, pauses [][2]int64) {
	t.Helper()
	n := 0
	for _, h := range holds {
		for _, p := range pauses {
			if h.Acq != 0 && h.Acq < p[0] && h.Rel > p[1] {
				n++
				if !h.Lost {
					t.Errorf("a hold in force across the server's pause did not report a loss: %+v", h)
				}
			}
		}
	}
	t.Logf("%d holds were in force when the server stopped", n)
}

// CLIENT KILL TYPE pubsub, again and again, while four clients contend:
// lost wake-ups delay waiters by at most the lease.
func TestPubsubKilledDuringContention(t *testing.T) {
	s := newServer(t)
	const lease = time.Second
	c := chaos.NewCoord()
	cfgs := workers(4, s.Addr, "mutex", lease, scale(4*time.Second))
	wait := runLocal(t, c, cfgs...)
	admin := rdbOf(t, s.Addr)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for end := time.Now().Add(cfgs[0].Duration); time.Now().Before(end); {
			time.Sleep(200 * time.Millisecond)
			_ = admin.Do(context.Background(), "CLIENT", "KILL", "TYPE", "pubsub").Err()
		}
	}()
	wait()
	<-done
	holds := checkAll(t, c)
	checkGaps(t, holds, lease+slack)
	nothingLeft(t, s.Addr, lease+slack)
}

// checkGaps checks that the lock never sat free longer than bound while
// workers (which always contend) waited: no lost wake-up delays a waiter
// past the lease.
func checkGaps(t *testing.T, holds []chaos.Hold, bound time.Duration) {
	t.Helper()
	var worst time.Duration
	for _, h := range holds {
		// The latest release before h's acquisition.
		var prev int64
		for _, g := range holds {
			if g.Rel < h.Acq && g.Rel > prev {
				prev = g.Rel
			}
		}
		if prev != 0 {
			worst = max(worst, time.Duration(h.Acq-prev))
		}
	}
	t.Logf("longest time the lock was free while contended: %v", worst)
	if worst > bound {
		t.Errorf("liveness: the lock was free %v while contended; bound %v", worst, bound)
	}
}

// A restart of Redis without persistence while locks are held and waiters
// wait: tokens still increase, holders learn their loss, waiters go on.
func TestServerRestartWithoutPersistence(t *testing.T) {
	s := newServer(t)
	const lease = time.Second
	c := chaos.NewCoord()
	cfgs := workers(3, s.Addr, "reentrant", lease, scale(5*time.Second))
	wait := runLocal(t, c, cfgs...)
	for i := 0; i < int(scale(2*time.Second)/time.Second); i++ {
		time.Sleep(1200 * time.Millisecond)
		if err := s.Restart(); err != nil {
			t.Fatal(err)
		}
		restarted := chaos.Mono()
		if _, ok := c.WaitEvent(lease+slack+time.Second, func(e chaos.Event) bool { return e.Kind == "acquired" && e.At > restarted }); !ok {
			t.Errorf("liveness: no acquisition within %v after the restart", lease+slack+time.Second)
		}
	}
	wait()
	checkAll(t, c) // CheckTokens: no token went backwards across the restarts
	nothingLeft(t, s.Addr, lease+slack)
}
