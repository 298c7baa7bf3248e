// Command bench measures redlatch beside the Go lock libraries users pick
// instead (go-redsync/redsync, bsm/redislock, rueidislock) and a raw floor
// (SET NX PX + compare-and-delete), on one redis-server in one run.
//
//	cd bench && go run .            # full run, a few minutes
//	cd bench && go run . -quick     # under a minute (CI)
//	cd bench && go run . -workloads W3 -libs 'redlatch Mutex,redislock' -cpuprofile cpu.out
//
// It starts its own redis-server on a free 127.0.0.1 port, or uses
// REDIS_ADDR when set. It prints markdown tables on stdout, progress on
// stderr, and writes results.json and chart.svg into -out (default: the
// current directory). See the README's "Benchmarks against other Go lock
// libraries" for the workloads. A run narrowed with -workloads or -libs
// prints its tables but writes no files, so that the committed results
// stay whole.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"
)

// config is what the command line sets.
type config struct {
	quick      bool
	out        string    // directory of results.json and chart.svg
	workloads  []string  // to run (W1…W4); empty: all
	libs       []string  // substrings of the library names to run; empty: all
	cpuprofile string    // file for a CPU profile of the whole run, or ""
	addr       string    // a Redis to use instead of starting one
	stdout     io.Writer // the tables
	log        io.Writer // progress
}

func main() {
	cfg := config{stdout: os.Stdout, log: os.Stderr, addr: os.Getenv("REDIS_ADDR")}
	flag.BoolVar(&cfg.quick, "quick", false, "short runs, under a minute in all (CI)")
	flag.StringVar(&cfg.out, "out", ".", "directory for results.json and chart.svg")
	workloads := flag.String("workloads", "", "comma-separated workloads to run, e.g. W1,W3 (default: all); a narrowed run writes no files")
	libs := flag.String("libs", "", "comma-separated substrings of the library names to run (default: all); a narrowed run writes no files")
	flag.StringVar(&cfg.cpuprofile, "cpuprofile", "", "write a CPU profile of the run to this file")
	flag.Parse()
	cfg.workloads, cfg.libs = splitList(*workloads), splitList(*libs)
	if err := run(cfg); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// workloadNames are the workloads -workloads may name.
var workloadNames = []string{"W1", "W2", "W3", "W4"}

// splitList splits a comma-separated flag value, dropping empty items.
func splitList(s string) []string {
	var out []string
	for _, x := range strings.Split(s, ",") {
		if x = strings.TrimSpace(x); x != "" {
			out = append(out, x)
		}
	}
	return out
}

// selected reports whether name is in the list, or the list is empty. With
// sub set, an item matching any part of name selects it.
func selected(list []string, name string, sub bool) bool {
	for _, x := range list {
		if x == name || sub && strings.Contains(name, x) {
			return true
		}
	}
	return len(list) == 0
}

// run runs the selected workloads and, unless the run is narrowed, writes
// the outputs.
func run(cfg config) error {
	narrowed := len(cfg.workloads) > 0 || len(cfg.libs) > 0
	for _, w := range cfg.workloads {
		if !slices.Contains(workloadNames, w) {
			return fmt.Errorf("-workloads: unknown workload %q (want some of %s)", w, strings.Join(workloadNames, ","))
		}
	}
	if !narrowed {
		if err := os.MkdirAll(cfg.out, 0o755); err != nil {
			return err
		}
	}
	var libs []library
	for _, l := range libraries() {
		if selected(cfg.libs, l.name, true) {
			libs = append(libs, l)
		}
	}
	if len(libs) == 0 {
		return fmt.Errorf("-libs %q selects no library", strings.Join(cfg.libs, ","))
	}
	if !slices.ContainsFunc(libs, func(l library) bool { return l.floor }) && selected(cfg.workloads, "W1", false) {
		fmt.Fprintln(cfg.log, "bench: the floor is not among -libs: W1's × floor column stays empty")
	}
	if cfg.cpuprofile != "" {
		f, err := os.Create(cfg.cpuprofile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	addr := cfg.addr
	if addr == "" {
		srv, err := startServer()
		if err != nil {
			return err
		}
		defer srv.close()
		// An interrupt kills the server and removes its directory.
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
		done := make(chan struct{}) // the watcher ends with the run
		defer func() { signal.Stop(sig); close(done) }()
		go func() {
			select {
			case <-sig:
				pprof.StopCPUProfile() // no-op without -cpuprofile
				srv.close()
				os.Exit(130)
			case <-done:
			}
		}()
		addr = srv.addr
	}
	stats := redis.NewClient(&redis.Options{Addr: addr})
	defer stats.Close()
	version, err := redisVersion(stats)
	if err != nil {
		return fmt.Errorf("redis at %s: %w", addr, err)
	}
	id := make([]byte, 4)
	_, _ = rand.Read(id)
	r := &runner{
		p:      paramsFor(cfg.quick),
		addr:   addr,
		stats:  stats,
		libs:   libs,
		prefix: "redlatch-bench:" + hex.EncodeToString(id),
		log:    cfg.log,
	}
	mode := "full"
	if cfg.quick {
		mode = "quick"
	}
	env := fmt.Sprintf("%s run, %s, redis %s, GOMAXPROCS %d, %s",
		mode, time.Now().UTC().Format("2006-01-02"), version, runtime.GOMAXPROCS(0), runtime.Version())
	r.logf("bench: %s", env)

	start := time.Now()
	var recs []record
	for _, w := range []struct {
		name string
		run  func() ([]record, error)
	}{{"W1", r.w1}, {"W2", r.w2}, {"W3", r.w3}, {"W4", r.w4}} {
		if !selected(cfg.workloads, w.name, false) {
			continue
		}
		t0 := time.Now()
		out, err := w.run()
		if err != nil {
			return fmt.Errorf("%s: %w", w.name, err)
		}
		recs = append(recs, out...)
		r.logf("%s done in %v", w.name, time.Since(t0).Round(time.Millisecond))
	}
	r.logf("bench: all done in %v", time.Since(start).Round(time.Millisecond))
	if narrowed {
		writeTables(cfg.stdout, recs, "## redlatch benchmarks, narrowed ("+env+")")
		return nil
	}

	jsonPath, chartPath := outPaths(cfg.out)
	if err := writeJSON(jsonPath, recs); err != nil {
		return err
	}
	if err := writeChart(chartPath, recs, env); err != nil {
		return err
	}
	writeTables(cfg.stdout, recs, "## redlatch benchmarks ("+env+")")
	r.logf("wrote %s and %s", jsonPath, chartPath)
	return nil
}

func redisVersion(rdb *redis.Client) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	info, err := rdb.Info(ctx, "server").Result()
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "redis_version:"); ok {
			return v, nil
		}
	}
	return "?", nil
}
