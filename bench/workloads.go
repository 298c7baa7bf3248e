package main

import (
	"context"
	"fmt"
	"io"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/redlatch/redlatch"
)

// params sizes the workloads.
type params struct {
	w1Rounds, w1Pairs int // W1: rounds, pairs per library per round

	w2Goroutines []int
	w2Rounds     int
	w2Slot       time.Duration // per library per round

	w3Rounds int
	w3Slot   time.Duration // per library per round
	w3CS     []time.Duration

	w4Locks   int
	w4Periods int
	w4Timeout time.Duration // watchdog timeout; the renewal period is a third of it
}

func paramsFor(quick bool) params {
	if quick {
		return params{
			w1Rounds: 5, w1Pairs: 100,
			w2Goroutines: []int{1, 4, 16, 64}, w2Rounds: 2, w2Slot: 150 * time.Millisecond,
			w3Rounds: 2, w3Slot: 600 * time.Millisecond, w3CS: []time.Duration{0, 100 * time.Microsecond},
			w4Locks: 10000, w4Periods: 2, w4Timeout: 3 * time.Second,
		}
	}
	return params{
		w1Rounds: 20, w1Pairs: 500,
		w2Goroutines: []int{1, 4, 16, 64}, w2Rounds: 4, w2Slot: 500 * time.Millisecond,
		w3Rounds: 5, w3Slot: 2 * time.Second, w3CS: []time.Duration{0, 100 * time.Microsecond},
		w4Locks: 10000, w4Periods: 5, w4Timeout: 3 * time.Second,
	}
}

// opTimeout bounds one Lock that cannot block (uncontended) and every
// Unlock: only a broken adapter or server reaches it.
const opTimeout = 10 * time.Second

// runner runs the workloads on one Redis.
type runner struct {
	p      params
	addr   string
	stats  *redis.Client // INFO only; no hook
	libs   []library
	prefix string // of every key of this run
	log    io.Writer
	seq    atomic.Int64
}

// key returns a key (lock name) used nowhere else in the run.
func (r *runner) key(tag string) string {
	return r.prefix + ":" + tag + ":" + strconv.FormatInt(r.seq.Add(1), 10)
}

func (r *runner) logf(format string, args ...any) { fmt.Fprintf(r.log, format+"\n", args...) }

// instance is one library opened as n client processes.
type instance struct {
	lib   library
	procs []*proc
	reqs  []*atomic.Int64
	errs  int
}

func (r *runner) open(n int) ([]*instance, error) {
	var out []*instance
	for _, lib := range r.libs {
		in := &instance{lib: lib}
		out = append(out, in)
		for range n {
			reqs := new(atomic.Int64)
			p, err := lib.open(r.addr, reqs)
			if err != nil {
				closeAll(out)
				return nil, fmt.Errorf("%s: %w", lib.name, err)
			}
			in.procs = append(in.procs, p)
			in.reqs = append(in.reqs, reqs)
		}
	}
	return out, nil
}

func closeAll(ins []*instance) {
	for _, in := range ins {
		for _, p := range in.procs {
			p.close()
		}
	}
}

// resetErrs starts a new error count for each instance (one per record).
func resetErrs(ins []*instance) {
	for _, in := range ins {
		in.errs = 0
	}
}

// rt is the number of requests the instance's processes sent so far.
func (in *instance) rt() int64 {
	var n int64
	for _, r := range in.reqs {
		n += r.Load()
	}
	return n
}

func (in *instance) fail(r *runner, what string, err error) {
	in.errs++
	if in.errs <= 3 {
		r.logf("  error: %s %s: %v", in.lib.name, what, err)
	}
}

// rotation returns the order of the instances in a round: each round starts
// one further, so that no library always runs first or last.
func rotation(n, round int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = (round + i) % n
	}
	return out
}

// pairs runs Lock+Unlock on l, n times or until deadline (n < 0), and
// returns how many pairs completed.
func pairs(in *instance, r *runner, l locker, n int, deadline time.Time) int {
	done := 0
	for n < 0 && time.Now().Before(deadline) || n >= 0 && done < n {
		ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
		err := l.Lock(ctx)
		if err == nil {
			err = l.Unlock(ctx)
		}
		cancel()
		if err != nil {
			in.fail(r, "lock/unlock", err)
			return done
		}
		done++
	}
	return done
}

// w1: uncontended Lock+Unlock on one goroutine, libraries interleaved.
func (r *runner) w1() ([]record, error) {
	ins, err := r.open(1)
	if err != nil {
		return nil, err
	}
	defer closeAll(ins)
	type acc struct {
		el    time.Duration
		pairs int
		rt    int64
		d     delta
	}
	accs := make([]acc, len(ins))
	locks := make([]locker, len(ins))
	for i, in := range ins {
		locks[i] = in.procs[0].newLock(r.key("w1"))
		pairs(in, r, locks[i], 20, time.Time{}) // warm-up: connections, script cache
	}
	for round := range r.p.w1Rounds {
		for _, i := range rotation(len(ins), round) {
			in := ins[i]
			s0, rt0 := takeSnapshot(r.stats), in.rt()
			t0 := time.Now()
			n := pairs(in, r, locks[i], r.p.w1Pairs, time.Time{})
			el := time.Since(t0)
			rt1, s1 := in.rt(), takeSnapshot(r.stats)
			a := &accs[i]
			a.el += el
			a.pairs += n
			a.rt += rt1 - rt0
			a.d.add(s0.to(s1))
		}
		r.logf("W1 round %d/%d", round+1, r.p.w1Rounds)
	}
	var floorUS float64
	for i, in := range ins {
		if in.lib.floor && accs[i].pairs > 0 {
			floorUS = float64(accs[i].el.Nanoseconds()) / 1e3 / float64(accs[i].pairs)
		}
	}
	var out []record
	for i, in := range ins {
		a := accs[i]
		rec := record{Library: in.lib.name, Workload: "W1", Goroutines: 1, Errors: in.errs}
		if a.pairs > 0 {
			n := float64(a.pairs)
			us := float64(a.el.Nanoseconds()) / 1e3 / n
			rec.USPerPair = num(us)
			if floorUS > 0 {
				rec.RatioToFloor = num(us / floorUS)
			}
			rec.RTPerAcq = a.d.per(float64(a.rt)+a.d.subs, n)
			rec.CmdsPerAcq = a.d.per(a.d.cmds, n)
			rec.RedisCPUPerAcq = a.d.per(a.d.cpu*1e6, n)
		}
		out = append(out, rec)
	}
	return out, nil
}

// w2Stall is how long after its slot an uncontended Lock of W2 may still
// be waiting before it counts as an error.
const w2Stall = time.Second

// w2: distinct keys, one per goroutine, g goroutines on one client process.
func (r *runner) w2() ([]record, error) {
	ins, err := r.open(1)
	if err != nil {
		return nil, err
	}
	defer closeAll(ins)
	var out []record
	for _, g := range r.p.w2Goroutines {
		type acc struct {
			el    time.Duration
			pairs int
			rt    int64
			d     delta
		}
		accs := make([]acc, len(ins))
		resetErrs(ins)
		for round := range r.p.w2Rounds {
			for _, i := range rotation(len(ins), round) {
				in := ins[i]
				locks := make([]locker, g)
				for j := range locks {
					locks[j] = in.procs[0].newLock(r.key("w2"))
				}
				var total atomic.Int64
				var wg sync.WaitGroup
				var mu sync.Mutex // guards in.errs
				s0, rt0 := takeSnapshot(r.stats), in.rt()
				t0 := time.Now()
				deadline := t0.Add(r.p.w2Slot)
				for _, l := range locks {
					wg.Add(1)
					go func() {
						defer wg.Done()
						n := 0
						for time.Now().Before(deadline) {
							// An uncontended Lock does not wait: one that is
							// still waiting w2Stall after the slot is an error.
							// lctx stays live until Unlock returns: rueidislock
							// ties the hold to the ctx given to WithContext and
							// releases the lock as soon as that ctx ends.
							lctx, lcancel := context.WithDeadline(context.Background(), deadline.Add(w2Stall))
							err := l.Lock(lctx)
							if err != nil {
								err = fmt.Errorf("lock: %w", err)
							} else {
								uctx, ucancel := context.WithTimeout(context.Background(), opTimeout)
								err = l.Unlock(uctx)
								ucancel()
							}
							lcancel()
							if err != nil {
								mu.Lock()
								in.fail(r, "lock/unlock", err)
								mu.Unlock()
								break
							}
							n++
						}
						total.Add(int64(n))
					}()
				}
				wg.Wait()
				el := time.Since(t0)
				rt1, s1 := in.rt(), takeSnapshot(r.stats)
				a := &accs[i]
				a.el += el
				a.pairs += int(total.Load())
				a.rt += rt1 - rt0
				a.d.add(s0.to(s1))
			}
			r.logf("W2 goroutines=%d round %d/%d", g, round+1, r.p.w2Rounds)
		}
		for i, in := range ins {
			a := accs[i]
			rec := record{Library: in.lib.name, Workload: "W2", Goroutines: g, Errors: in.errs}
			if a.pairs > 0 {
				n := float64(a.pairs)
				rec.AcqPerS = num(n / a.el.Seconds())
				rec.RTPerAcq = a.d.per(float64(a.rt)+a.d.subs, n)
				rec.CmdsPerAcq = a.d.per(a.d.cmds, n)
				rec.RedisCPUPerAcq = a.d.per(a.d.cpu*1e6, n)
			}
			out = append(out, rec)
		}
	}
	return out, nil
}

// hotResult is what one W3 slot, or the sum of a library's slots, measured.
type hotResult struct {
	el       time.Duration
	acq      int
	handoffs []time.Duration // release by one owner to acquisition by another
	waits    []time.Duration // Lock call to acquisition, completed acquisitions
	censored time.Duration   // longest wait still going on when the slot ended
	jains    []float64       // per slot
	rt       int64
	d        delta
}

const (
	w3Goroutines = 16
	w3Clients    = 2
)

// w3: one hot key, 16 goroutines over 2 client processes, each goroutine
// its own handle (owner), with a critical section of cs.
func (r *runner) w3() ([]record, error) {
	ins, err := r.open(w3Clients)
	if err != nil {
		return nil, err
	}
	defer closeAll(ins)
	var out []record
	for _, cs := range r.p.w3CS {
		res := make([]hotResult, len(ins))
		resetErrs(ins)
		for round := range r.p.w3Rounds {
			for _, i := range rotation(len(ins), round) {
				r.hotSlot(ins[i], cs, &res[i])
			}
			r.logf("W3 cs=%v round %d/%d", cs, round+1, r.p.w3Rounds)
		}
		for i, in := range ins {
			a := res[i]
			rec := record{Library: in.lib.name, Workload: "W3", Goroutines: w3Goroutines, CSus: float64(cs.Microseconds()), Errors: in.errs}
			if a.acq > 0 {
				n := float64(a.acq)
				handoffs := sortedCopy(a.handoffs)
				waits := sortedCopy(a.waits)
				var j float64
				for _, x := range a.jains {
					j += x
				}
				rec.AcqPerS = num(n / a.el.Seconds())
				rec.Handoffs = len(handoffs)
				if len(handoffs) > 0 { // none: unknown, not 0 µs
					rec.HandoffP50 = num(percentile(handoffs, 0.5))
					rec.HandoffP99 = num(percentile(handoffs, 0.99))
				}
				rec.WaitP99 = num(percentile(waits, 0.99) / 1e3)
				rec.WaitMax = num(max(percentile(waits, 1), float64(a.censored.Nanoseconds())/1e3) / 1e3)
				rec.Jain = num(j / float64(len(a.jains)))
				rec.RTPerAcq = a.d.per(float64(a.rt)+a.d.subs, n)
				rec.CmdsPerAcq = a.d.per(a.d.cmds, n)
				rec.RedisCPUPerAcq = a.d.per(a.d.cpu*1e6, n)
			}
			out = append(out, rec)
		}
	}
	return out, nil
}

// hotSlot runs one W3 slot of one library and adds it to res. Lock calls
// share a context that ends with the slot; a wait cut short there is not an
// acquisition, but its length so far still counts toward wait max.
func (r *runner) hotSlot(in *instance, cs time.Duration, res *hotResult) {
	key := r.key("w3")
	var (
		mu       sync.Mutex
		recs     []holdRec
		waits    []time.Duration
		censored time.Duration
		counts   = make([]int, w3Goroutines)
		wg       sync.WaitGroup
	)
	locks := make([]locker, w3Goroutines)
	for g := range locks {
		locks[g] = in.procs[g%w3Clients].newLock(key)
	}
	s0, rt0 := takeSnapshot(r.stats), in.rt()
	start := time.Now()
	ctx, cancel := context.WithDeadline(context.Background(), start.Add(r.p.w3Slot))
	defer cancel()
	for g, l := range locks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				t0 := time.Now()
				err := l.Lock(ctx)
				acq := time.Now()
				if err != nil {
					mu.Lock()
					if ctx.Err() != nil {
						censored = max(censored, acq.Sub(t0))
					} else {
						in.fail(r, "lock", err)
					}
					mu.Unlock()
					return
				}
				if cs > 0 {
					holdFor(cs)
				}
				rel := time.Now()
				sh, _ := l.(interface{ Shared() bool })
				mu.Lock()
				recs = append(recs, holdRec{g: g, acq: acq, rel: rel, shared: sh != nil && sh.Shared()})
				waits = append(waits, acq.Sub(t0))
				counts[g]++
				mu.Unlock()
				uctx, ucancel := context.WithTimeout(context.Background(), opTimeout)
				err = l.Unlock(uctx)
				ucancel()
				if err != nil {
					mu.Lock()
					in.fail(r, "unlock", err)
					mu.Unlock()
					return
				}
			}
		}()
	}
	wg.Wait()
	time.Sleep(20 * time.Millisecond) // let late UNSUBSCRIBEs land in this slot
	rt1, s1 := in.rt(), takeSnapshot(r.stats)

	// The slot's length, or up to its last acquisition when a Lock returned
	// just after the deadline.
	el := r.p.w3Slot
	if len(recs) > 0 {
		el = max(el, recs[len(recs)-1].acq.Sub(start))
	}
	res.el += el
	res.acq += len(recs)
	res.handoffs = append(res.handoffs, handoffGaps(recs)...)
	res.waits = append(res.waits, waits...)
	res.censored = max(res.censored, censored)
	res.jains = append(res.jains, jain(counts))
	res.rt += rt1 - rt0
	res.d.add(s0.to(s1))
}

// holdRec is one hold of a W3 slot: its goroutine, when it was acquired
// and when its Unlock was called, and whether it was a shared (read) hold.
type holdRec struct {
	g        int
	acq, rel time.Time
	shared   bool
}

// handoffGaps returns, for each hold of recs (in the order of their
// releases) that another goroutine's hold passed on to, the time from the
// previous release to its acquisition. Overlapping holds, and a read hold
// following a read hold (which did not wait for it), are not handoffs;
// but the first read hold of another goroutine after a write and the
// writer's own read holds is a handoff from that write.
func handoffGaps(recs []holdRec) []time.Duration {
	var out []time.Duration
	for i := 1; i < len(recs); i++ {
		a, b := recs[i-1], recs[i]
		if a.shared && b.shared {
			// b did not wait for a's read hold. But read holds that the
			// writer took just after its write hold (b did not wait for
			// them either) hide the write that b did wait for: look past
			// them to it.
			j := i - 1
			for j >= 0 && recs[j].shared && recs[j].g == a.g {
				j--
			}
			if j < 0 || recs[j].shared || recs[j].g != a.g {
				continue
			}
			a = recs[j]
		}
		if gap := b.acq.Sub(a.rel); b.g != a.g && gap >= 0 {
			out = append(out, gap)
		}
	}
	return out
}

// w4: redlatch's watchdog renewing w4Locks held Mutexes of one Client.
// Measured over whole renewal periods: the window starts and ends half a
// period after a renewal burst.
func (r *runner) w4() ([]record, error) {
	reqs := new(atomic.Int64)
	rdb := newGoRedis(r.addr, reqs)
	defer rdb.Close()
	c := redlatch.New(rdb, redlatch.WithWatchdogTimeout(r.p.w4Timeout))
	defer c.Close()
	period := r.p.w4Timeout / 3
	base := r.key("w4")
	locks := make([]*redlatch.Mutex, r.p.w4Locks)
	for i := range locks {
		locks[i] = c.Mutex(base + "-" + strconv.Itoa(i))
	}
	rec := record{Library: "redlatch Mutex", Workload: "W4", HeldLocks: r.p.w4Locks, PeriodMS: float64(period.Milliseconds())}
	var errs atomic.Int64
	parallel := func(f func(m *redlatch.Mutex) error) {
		var wg sync.WaitGroup
		const workers = 32
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; i < len(locks); i += workers {
					if err := f(locks[i]); err != nil && errs.Add(1) <= 3 {
						r.logf("  error: W4: %v", err)
					}
				}
			}()
		}
		wg.Wait()
	}
	t0 := time.Now()
	parallel(func(m *redlatch.Mutex) error {
		ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
		defer cancel()
		return m.Lock(ctx)
	})
	r.logf("W4: %d locks taken in %v", len(locks), time.Since(t0).Round(time.Millisecond))

	// Wait for a renewal burst: the first request after a quiet moment.
	// Nothing else uses this client while the locks are held.
	n0 := reqs.Load()
	burst := time.Now().Add(2 * period)
	for reqs.Load() == n0 && time.Now().Before(burst) {
		time.Sleep(2 * time.Millisecond)
	}
	burst = time.Now()
	time.Sleep(time.Until(burst.Add(period / 2)))
	s0, rt0 := takeSnapshot(r.stats), reqs.Load()
	time.Sleep(time.Until(burst.Add(period/2 + time.Duration(r.p.w4Periods)*period)))
	rt1, s1 := reqs.Load(), takeSnapshot(r.stats)
	d := s0.to(s1)
	n := float64(r.p.w4Periods)
	rec.RTPerPeriod = num(float64(rt1-rt0) / n)
	rec.CmdsPerPeriod = d.per(d.cmds, n)
	rec.ScriptsPerPeriod = d.per(d.scripts, n)
	rec.RedisCPUMsPerPeriod = d.per(d.cpu*1e3, n)
	parallel(func(m *redlatch.Mutex) error {
		ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
		defer cancel()
		return m.Unlock(ctx)
	})
	rec.Errors = int(errs.Load())
	r.logf("W4: measured %d periods of %v", r.p.w4Periods, period)
	return []record{rec}, nil
}

// holdFor spends d inside the critical section. time.Sleep cannot: a sleep
// shorter than a millisecond lasts about a millisecond on Linux when the
// process is otherwise idle (measured here: Sleep(100µs) took 1.13 ms), and
// less when other goroutines keep the scheduler busy, so it would favour
// whichever lock makes more background traffic. A loop that yields keeps the
// section within microseconds of d and lets the other goroutines run.
func holdFor(d time.Duration) {
	for start := time.Now(); time.Since(start) < d; {
		runtime.Gosched()
	}
}
