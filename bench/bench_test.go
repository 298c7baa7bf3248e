package main

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// testLog sends progress lines to t.Log.
type testLog struct{ t *testing.T }

func (w testLog) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// needServer skips the test when there is neither REDIS_ADDR nor a
// redis-server to start, or fails it with REDLATCH_REQUIRE_REDIS=1.
func needServer(t *testing.T) {
	t.Helper()
	if os.Getenv("REDIS_ADDR") == "" {
		if _, err := exec.LookPath(serverBinary()); err != nil {
			if os.Getenv("REDLATCH_REQUIRE_REDIS") == "1" {
				t.Fatal("redis-server not found and REDLATCH_REQUIRE_REDIS=1")
			}
			t.Skip("redis-server not found; set REDIS_ADDR or install redis-server")
		}
	}
}

// TestQuickRun runs `go run . -quick` end to end against a redis-server it
// starts (or REDIS_ADDR), and checks that every library and workload
// produced its record, the tables and the chart. It checks no performance
// figure: the numbers of a run on a shared machine are not pass/fail.
func TestQuickRun(t *testing.T) {
	needServer(t)
	out := t.TempDir()
	var stdout bytes.Buffer
	start := time.Now()
	err := run(config{quick: true, out: out, addr: os.Getenv("REDIS_ADDR"), stdout: &stdout, log: testLog{t}})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("quick run took %v", time.Since(start))
	t.Log("\n" + stdout.String())

	jsonPath, chartPath := outPaths(out)
	b, err := os.ReadFile(jsonPath)
	if err != nil {
		t.Fatal(err)
	}
	var recs []map[string]any
	if err := json.Unmarshal(b, &recs); err != nil {
		t.Fatal(err)
	}
	fields := []string{"library", "workload", "goroutines", "cs_us", "us_per_pair", "acq_per_s",
		"handoff_p50_us", "handoff_p99_us", "wait_p99_ms", "wait_max_ms", "jain", "rt_per_acq", "redis_cpu_us_per_acq"}
	have := map[string]int{}
	for _, r := range recs {
		for _, f := range fields {
			if _, ok := r[f]; !ok {
				t.Errorf("record %v lacks field %q", r, f)
			}
		}
		have[r["library"].(string)+"/"+r["workload"].(string)]++
		if n, _ := r["errors"].(float64); n > 0 {
			// Not a failure: a library may time out under load (see
			// the README's Workloads); the run must complete all the same.
			t.Logf("%s %s: %v errors", r["library"], r["workload"], n)
		}
	}
	p := paramsFor(true)
	for _, lib := range libraries() {
		for wl, n := range map[string]int{"W1": 1, "W2": len(p.w2Goroutines), "W3": len(p.w3CS)} {
			if have[lib.name+"/"+wl] != n {
				t.Errorf("%s %s: %d records, want %d", lib.name, wl, have[lib.name+"/"+wl], n)
			}
		}
	}
	if have["redlatch Mutex/W4"] != 1 {
		t.Errorf("no W4 record")
	}
	for _, r := range recs {
		if r["workload"] == "W3" && r["acq_per_s"] == nil {
			t.Errorf("%s W3 cs=%v: no acquisition", r["library"], r["cs_us"])
		}
	}

	svg, err := os.ReadFile(chartPath)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(svg, []byte("<svg")) || !bytes.Contains(svg, []byte("redlatch Mutex")) {
		t.Errorf("chart.svg does not look like the chart: %.200s", svg)
	}
	for _, h := range []string{"### W1", "### W2", "### W3", "### W4", "| redlatch Mutex |"} {
		if !strings.Contains(stdout.String(), h) {
			t.Errorf("stdout lacks %q", h)
		}
	}
}

// TestRequestCounterSkipsHandshake: a go-redis connection's handshake
// (HELLO, CLIENT MAINT_NOTIFICATIONS, CLIENT SETINFO) runs through the
// client's hooks; counting it made every connection dialled inside a
// measured run add round trips to the go-redis based libraries, never to
// rueidislock (whose handshake bypasses the counted Do). (Found by a
// reviewer.)
func TestRequestCounterSkipsHandshake(t *testing.T) {
	needServer(t)
	addr := os.Getenv("REDIS_ADDR")
	if addr == "" {
		s, err := startServer()
		if err != nil {
			t.Fatal(err)
		}
		defer s.close()
		addr = s.addr
	}
	var n atomic.Int64
	rdb := newGoRedis(addr, &n)
	defer rdb.Close()
	if err := rdb.Ping(t.Context()).Err(); err != nil {
		t.Fatal(err)
	}
	if got := n.Load(); got != 1 {
		t.Errorf("one PING on a fresh connection counted %d requests, want 1", got)
	}
	n.Store(0)
	_, _ = rdb.Pipelined(t.Context(), func(p redis.Pipeliner) error {
		p.Ping(t.Context())
		p.Ping(t.Context())
		return nil
	})
	if got := n.Load(); got != 1 {
		t.Errorf("a pipeline counted %d, want 1", got)
	}
}

// TestReadHeavy checks the RWMutex workload adapter: nine reads, then one
// write, each Unlock matching its Lock.
func TestReadHeavy(t *testing.T) {
	var ops []string
	op := func(name string) func(context.Context) error {
		return func(context.Context) error { ops = append(ops, name); return nil }
	}
	l := readHeavy(op("rl"), op("ru"), op("wl"), op("wu"))
	for range 20 {
		_ = l.Lock(context.Background())
		_ = l.Unlock(context.Background())
	}
	want := strings.Repeat("rl ru ", 9) + "wl wu "
	if got := strings.Join(ops, " ") + " "; got != want+want {
		t.Fatalf("ops = %s", got)
	}
	// It tells which kind of hold its last Lock took (see handoffGaps).
	sh := l.(interface{ Shared() bool })
	for i := 1; i <= 10; i++ {
		_ = l.Lock(context.Background())
		if sh.Shared() != (i != 10) {
			t.Fatalf("lock %d: Shared() = %v", i, sh.Shared())
		}
		_ = l.Unlock(context.Background())
	}
}

// TestHandoffGaps: a read hold that follows another goroutine's read hold
// did not wait for it (read holds share the lock), so it is no handoff;
// counting it made nearly every RWMutex acquisition in W3 a "handoff" of
// about 20µs. A write after a read, or a read after a write, is one;
// overlapping holds are not. (Found by a reviewer.)
func TestHandoffGaps(t *testing.T) {
	t0 := time.Now()
	at := func(us int) time.Time { return t0.Add(time.Duration(us) * time.Microsecond) }
	recs := []holdRec{
		{g: 0, acq: at(0), rel: at(5), shared: true},
		{g: 1, acq: at(20), rel: at(25), shared: true},    // read after read: not a handoff
		{g: 2, acq: at(30), rel: at(35), shared: true},    // idem
		{g: 3, acq: at(135), rel: at(140), shared: false}, // write after read: 100µs
		{g: 4, acq: at(250), rel: at(255), shared: true},  // read after write: 110µs
		{g: 5, acq: at(240), rel: at(260), shared: true},  // overlapping read
	}
	got := handoffGaps(recs)
	want := []time.Duration{100 * time.Microsecond, 110 * time.Microsecond}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("handoff gaps = %v, want %v", got, want)
	}
}

// TestChartIsWellFormedXML: chart.svg must parse as XML, or no browser (nor
// GitHub's README) shows it: its footer's "&&" was written bare. (Found by
// a reviewer.)
func TestChartIsWellFormedXML(t *testing.T) {
	recs := []record{
		{Library: "redlatch Mutex", Workload: "W3", CSus: 0, WaitP99: num(3.3), WaitMax: num(7.1), RedisCPUPerAcq: num(52)},
		{Library: "floor (SET NX PX + CAS)", Workload: "W3", CSus: 0, WaitP99: num(24), WaitMax: num(82), RedisCPUPerAcq: num(50)},
	}
	path := filepath.Join(t.TempDir(), "chart.svg")
	if err := writeChart(path, recs, "quick run, <test> & more"); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	d := xml.NewDecoder(bytes.NewReader(b))
	for {
		if _, err := d.Token(); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("chart.svg is not well-formed XML: %v", err)
		}
	}
}

func TestStats(t *testing.T) {
	if j := jain([]int{5, 5, 5, 5}); j != 1 {
		t.Errorf("jain equal = %v", j)
	}
	if j := jain([]int{8, 0, 0, 0}); j != 0.25 {
		t.Errorf("jain one = %v", j)
	}
	d := []time.Duration{1 * time.Microsecond, 2 * time.Microsecond, 3 * time.Microsecond, 4 * time.Microsecond}
	if p := percentile(d, 0.5); p != 2 {
		t.Errorf("p50 = %v", p)
	}
	if p := percentile(d, 1); p != 4 {
		t.Errorf("max = %v", p)
	}
	if p := percentile(nil, 0.99); p != 0 {
		t.Errorf("empty = %v", p)
	}
	// A failed INFO makes the figures from it unknown (null), not a
	// difference with zero.
	good := snapshot{cpu: 2, calls: map[string]float64{"evalsha": 10}}
	if x := (snapshot{cpu: 1, calls: map[string]float64{}}).to(good).per(1e6, 1); x == nil || *x != 1e6 {
		t.Errorf("cpu per acquisition = %v", x)
	}
	var sum delta
	sum.add(snapshot{calls: map[string]float64{}, bad: true}.to(good))
	sum.add(snapshot{cpu: 1, calls: map[string]float64{}}.to(good))
	if x := sum.per(sum.cpu, 1); x != nil {
		t.Errorf("cpu per acquisition after a failed INFO = %v, want nil", *x)
	}
}

// TestNarrowedRun runs one workload of two libraries, as -workloads and
// -libs do, and checks that only they ran and that no file was written.
func TestNarrowedRun(t *testing.T) {
	needServer(t)
	out := t.TempDir()
	var stdout bytes.Buffer
	err := run(config{quick: true, out: out, addr: os.Getenv("REDIS_ADDR"), stdout: &stdout, log: testLog{t},
		workloads: []string{"W1"}, libs: []string{"floor", "redislock"}})
	if err != nil {
		t.Fatal(err)
	}
	tables := stdout.String()
	for _, want := range []string{"### W1", "| floor (SET NX PX + CAS) |", "| redislock (backoff 1-64ms) |"} {
		if !strings.Contains(tables, want) {
			t.Errorf("tables lack %q:\n%s", want, tables)
		}
	}
	for _, unwanted := range []string{"### W2", "### W3", "redlatch Mutex"} {
		if strings.Contains(tables, unwanted) {
			t.Errorf("tables hold %q:\n%s", unwanted, tables)
		}
	}
	if entries, _ := os.ReadDir(out); len(entries) > 0 {
		t.Errorf("a narrowed run wrote %v", entries)
	}
	err = run(config{quick: true, out: out, addr: os.Getenv("REDIS_ADDR"), stdout: &stdout, log: testLog{t},
		libs: []string{"no such library"}})
	if err == nil || !strings.Contains(err.Error(), "selects no library") {
		t.Errorf("-libs selecting nothing: %v", err)
	}
	err = run(config{quick: true, out: out, addr: os.Getenv("REDIS_ADDR"), stdout: &stdout, log: testLog{t},
		workloads: []string{"w1"}})
	if err == nil || !strings.Contains(err.Error(), "unknown workload") {
		t.Errorf("-workloads naming no workload: %v", err)
	}
}

// TestVersionAtLeast: rueidislock runs with NoLoopTracking, as its README
// asks for a single Redis >= 7.0.5; older servers keep the default.
func TestVersionAtLeast(t *testing.T) {
	for v, want := range map[string]bool{
		"7.0.15": true, "7.0.5": true, "7.0.4": false, "6.2.14": false,
		"7.2.4": true, "8.0.0": true, "7": false, "7.0": false,
	} {
		if got := versionAtLeast(v, 7, 0, 5); got != want {
			t.Errorf("versionAtLeast(%q, 7.0.5) = %v, want %v", v, got, want)
		}
	}
}

// TestHandoffGapsWriterReadsFirst: in the read-heavy W3 mix the goroutine
// that releases a write hold calls Lock again at once, for a read hold, and
// usually gets it first, before the other goroutines' read holds that were
// waiting for the write. Those waiters were handed the lock by the write
// (another owner); the writer's own read hold, which they did not wait for,
// must not hide that handoff.
func TestHandoffGapsWriterReadsFirst(t *testing.T) {
	t0 := time.Now()
	at := func(us int) time.Time { return t0.Add(time.Duration(us) * time.Microsecond) }
	recs := []holdRec{
		{g: 1, acq: at(0), rel: at(10), shared: false},    // write by g1
		{g: 1, acq: at(12), rel: at(15), shared: true},    // g1's next Lock: a read; same owner, no handoff
		{g: 2, acq: at(40), rel: at(45), shared: true},    // g2 waited for g1's write: handoff, 30µs
		{g: 3, acq: at(42), rel: at(50), shared: true},    // read after g2's read: not a handoff
		{g: 4, acq: at(150), rel: at(160), shared: false}, // write after g3's read: 100µs
	}
	got := handoffGaps(recs)
	want := []time.Duration{30 * time.Microsecond, 100 * time.Microsecond}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("handoff gaps = %v, want %v", got, want)
	}
}
