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
	slow := 0
	for _, h := range checkAll(t, c) {
		if h.Lost {
			t.Errorf("hold lost with latency under the lease: %+v", h)
		}
		if h.Worker == "w1" {
			slow++
		}
	}
	t.Logf("the client behind the latency acquired %d times", slow)
	if slow == 0 {
		t.Error("vacuous: the client behind the latency never acquired")
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
// clients contend. A fourth, the victim, holds long (past the pause) and is
// holding each time the server stops: so that every pause is spanned by a
// hold, and one whose holder looks at Lost() after the server resumed.
func TestServerPausedPastLease(t *testing.T) {
	s := newServer(t)
	const lease = time.Second
	rounds := int(scale(time.Second) / time.Second)
	c, wait, w := withVictim(t, s, "mutex", lease, rounds, 2*lease+500*time.Millisecond)
	var spans []span
	for i := 0; i < rounds; i++ {
		before := w.held(t)
		if err := s.Stop(); err != nil {
			t.Fatal(err)
		}
		stopped := chaos.Mono()
		time.Sleep(2 * lease)
		if err := s.Cont(); err != nil {
			t.Fatal(err)
		}
		resumed := chaos.Mono()
		// The lease of a hold ran out during the pause (its last renewal was
		// sent before it): the watchdog closes Lost then, without a reply.
		spans = append(spans, span{before, stopped, before + int64(lease+300*time.Millisecond)})
		if !w.wait(lease+slack, resumed) {
			t.Errorf("liveness: no acquisition within %v after the server resumed", lease+slack)
		}
	}
	wait()
	checkLostAcross(t, checkAll(t, c), spans)
	nothingLeft(t, s.Addr, lease+slack)
}

// span is a fault that loses the locks held, on Mono: before it began,
// once it was in force, and by when the holders must have seen Lost() close.
type span struct{ before, in, by int64 }

// withVictim starts 3 workers of kind contending on s (watchdog timeout
// lease) and a fourth, "victim", that takes the lock rounds times and holds
// it hold each time; it returns their coordinator, the wait for their end
// and a victimWaiter on them.
func withVictim(t *testing.T, s *chaos.Server, kind string, lease time.Duration, rounds int, hold time.Duration) (*chaos.Coord, func(), *victimWaiter) {
	t.Helper()
	c := chaos.NewCoord()
	cfgs := workers(3, s.Addr, kind, lease, scale(5*time.Second))
	victim := workers(1, s.Addr, kind, lease, time.Minute)[0]
	victim.Name, victim.Ops = "victim", rounds
	victim.HoldMin, victim.HoldMax, victim.LostGrace = hold, hold, lease
	wait := runLocal(t, c, append(cfgs, victim)...)
	return c, wait, &victimWaiter{c: c}
}

// victimWaiter waits for the acquisitions of the worker "victim" and of
// anyone, without losing a victim's acquisition that another wait matched.
type victimWaiter struct {
	c    *chaos.Coord
	seen int64 // At of a victim's acquisition that wait matched, not yet taken
}

// next waits up to d for the victim's next acquisition.
func (w *victimWaiter) next(d time.Duration) bool {
	if w.seen != 0 {
		w.seen = 0
		return true
	}
	_, ok := w.c.WaitEvent(d, func(e chaos.Event) bool { return e.Kind == "acquired" && e.Worker == "victim" })
	return ok
}

// held waits for the victim's next acquisition and for it to be in force a
// little, and returns the time on Mono.
func (w *victimWaiter) held(t *testing.T) int64 {
	t.Helper()
	if !w.next(15 * time.Second) {
		t.Fatal("the victim did not acquire")
	}
	time.Sleep(50 * time.Millisecond)
	return chaos.Mono()
}

// wait waits up to d for anyone's acquisition after t.
func (w *victimWaiter) wait(d time.Duration, t int64) bool {
	_, ok := w.c.WaitEvent(d, func(e chaos.Event) bool {
		if e.Kind != "acquired" {
			return false
		}
		if e.Worker == "victim" {
			w.seen = e.At
		}
		return e.At > t
	})
	return ok
}

// checkLostAcross checks that the holds in force when a fault lost their
// locks learnt it, in time, and that the check is not vacuous: each fault
// is spanned by at least one hold kept until after its by.
//
// A hold acquired before the fault and still held once it was in force
// (its Unlock, if any, was served after the fault) reports a loss: Lost
// closed or Unlock returned ErrNotHeld. One still held at by must have seen
// Lost() close, by then: the watchdog tells the holder, Unlock does not.
func checkLostAcross(t *testing.T, holds []chaos.Hold, spans []span) {
	t.Helper()
	for _, p := range spans {
		n, told := 0, 0
		for _, h := range holds {
			if h.Acq == 0 || h.Acq >= p.before || h.Rel <= p.in {
				continue
			}
			n++
			if !h.Lost {
				t.Errorf("a hold in force across the fault did not report a loss: %+v", h)
			}
			if h.Rel <= p.by {
				continue
			}
			told++
			switch {
			case !h.LostSeen:
				t.Errorf("a hold kept %v past the fault did not see Lost() close: %+v", time.Duration(h.Rel-p.before), h)
			case h.LostAt > p.by:
				t.Errorf("Lost() closed %v after the fault began, %v late: %+v",
					time.Duration(h.LostAt-p.before), time.Duration(h.LostAt-p.by), h)
			default:
				t.Logf("Lost() closed %v after the fault began (bound %v)",
					time.Duration(h.LostAt-p.before), time.Duration(p.by-p.before))
			}
		}
		t.Logf("%d holds were in force when the fault began, %d kept past its bound", n, told)
		if told == 0 {
			t.Error("vacuous: no hold was kept across the fault, so Lost() was not checked")
		}
	}
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
	var killed int64 // pub/sub connections killed: waiters' wake-ups lost
	go func() {
		defer close(done)
		for end := time.Now().Add(cfgs[0].Duration); time.Now().Before(end); {
			time.Sleep(200 * time.Millisecond)
			n, _ := admin.Do(context.Background(), "CLIENT", "KILL", "TYPE", "pubsub").Int64()
			killed += n
		}
	}()
	wait()
	<-done
	t.Logf("%d pub/sub connections killed", killed)
	if killed == 0 {
		t.Error("vacuous: no pub/sub connection was killed")
	}
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
// wait: tokens still increase, holders learn their loss, waiters go on. The
// victim holds longer than its lease and is holding at each restart: its
// Lost() must close (the renewal after the restart finds the lock gone).
func TestServerRestartWithoutPersistence(t *testing.T) {
	s := newServer(t)
	const lease = time.Second
	rounds := int(scale(2*time.Second) / time.Second)
	c, wait, w := withVictim(t, s, "reentrant", lease, rounds, lease*3/2)
	var spans []span
	for i := 0; i < rounds; i++ {
		before := w.held(t)
		if err := s.Restart(); err != nil {
			t.Fatal(err)
		}
		restarted := chaos.Mono()
		// The next renewal (every lease/3) finds the lock gone: Lost closes
		// then, well before the lease it had could run out.
		spans = append(spans, span{before, restarted, restarted + int64(lease/3+300*time.Millisecond)})
		if !w.wait(lease+slack+time.Second, restarted) {
			t.Errorf("liveness: no acquisition within %v after the restart", lease+slack+time.Second)
		}
	}
	wait()
	// CheckTokens: no token went backwards across the restarts.
	checkLostAcross(t, checkAll(t, c), spans)
	nothingLeft(t, s.Addr, lease+slack)
}
