// Package leakcheck finds goroutines that outlive a test run.
//
// Check takes a snapshot of every goroutine (runtime.Stack with all=true),
// drops the ones that belong to the Go runtime and the testing package, and
// reports the rest: after the tests have returned and every client and
// server has been closed, any goroutine still running was leaked by the code
// under test or by the tests themselves.
//
// Goroutines of go-redis and miniredis are deliberately NOT ignored: once a
// client or server is closed its goroutines exit (within about a second for
// go-redis's dial prober), so one still running after the wait means a client,
// a pub/sub subscription or a server was never closed.
package leakcheck

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"time"
)

// machinery lists the function-name prefixes of goroutines that are not the
// code under test's. A goroutine is ignored when one of its frames, or the
// function that created it, starts with one of these prefixes.
//
// The list is short on purpose; every entry is needed:
var machinery = []string{
	"testing.(*M).",      // the main goroutine inside testing.(*M).Run
	"testing.tRunner",    // the goroutine of a test that is still running
	"testing.runTests",   // the goroutine that runs the top-level tests
	"testing.runFuzz",    // the fuzzing coordinator (go test -fuzz)
	"os/signal.",         // signal.Notify's receive loop ("created by os/signal...")
	"runtime.ensureSigM", // the runtime half of os/signal
}

// also lists the prefixes a test binary added with Ignore.
var also []string

// Ignore adds function-name prefixes of goroutines Check does not report,
// as for the machinery: goroutines of a test tool known to outlive its own
// shutdown, not the code under test's. Call it from TestMain, before Exit.
func Ignore(prefixes ...string) {
	also = append(also, prefixes...)
}

// Check returns an error listing the goroutines still running that are not
// part of the Go runtime or the testing machinery, after waiting up to wait
// for them to exit. The goroutine calling Check is never reported. It returns
// nil when there are none.
func Check(wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		leaked := Goroutines()
		if len(leaked) == 0 {
			return nil
		}
		if !time.Now().Before(deadline) {
			return fmt.Errorf("leakcheck: %d goroutine(s) still running after %v:\n\n%s",
				len(leaked), wait, strings.Join(leaked, "\n\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Goroutines returns the stack of every goroutine that Check would report
// right now, one string per goroutine.
func Goroutines() []string {
	var out []string
	for i, g := range strings.Split(stacks(), "\n\n") {
		if i == 0 { // runtime.Stack puts the calling goroutine first
			continue
		}
		g = strings.TrimSpace(g)
		if g == "" || ignored(g) {
			continue
		}
		out = append(out, g)
	}
	return out
}

// stacks returns runtime.Stack(all=true), growing the buffer until it fits.
func stacks() string {
	buf := make([]byte, 64<<10)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return string(buf[:n])
		}
		buf = make([]byte, 2*len(buf))
	}
}

// ignored reports whether the goroutine whose traceback is g belongs to the
// runtime or the testing machinery: one of its functions or its creator
// matches machinery, or all its frames are in package runtime.
func ignored(g string) bool {
	onlyRuntime := true
	for _, line := range strings.Split(g, "\n")[1:] { // [0] is "goroutine N [state]:"
		if line == "" || line[0] == '\t' || strings.HasPrefix(line, "...") {
			continue // file:line, or "...additional frames elided..."
		}
		fn := strings.TrimPrefix(line, "created by ")
		if i := strings.Index(fn, " in goroutine "); i >= 0 {
			fn = fn[:i]
		}
		if strings.HasSuffix(fn, ")") { // strip the arguments: "pkg.f(0x1, ...)"
			if i := strings.LastIndex(fn, "("); i > 0 {
				fn = fn[:i]
			}
		}
		for _, m := range machinery {
			if strings.HasPrefix(fn, m) {
				return true
			}
		}
		for _, m := range also {
			if strings.HasPrefix(fn, m) {
				return true
			}
		}
		if !strings.HasPrefix(line, "created by ") && !strings.HasPrefix(fn, "runtime.") {
			onlyRuntime = false
		}
	}
	return onlyRuntime
}

// Exit ends a test binary, for use at the end of TestMain: it exits with
// code, the result of m.Run, or 1 when goroutines are still running after
// wait (see Check); their stacks are printed to stderr.
func Exit(code int, wait time.Duration) {
	if err := Check(wait); err != nil {
		fmt.Fprintln(os.Stderr, "FAIL:", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}
