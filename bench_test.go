package redlatch_test

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// benchBackend returns the real single redis-server when there is one, else
// miniredis.
func benchBackend(b *testing.B) redistest.Backend {
	b.Helper()
	backends := redistest.Backends(b)
	for _, be := range backends {
		if be.Name == "redis" {
			return be
		}
	}
	return backends[0]
}

// setNXPX is the floor's acquisition: SET key owner PX 30000 NX (go-redis's
// SetNX would send EX for a whole number of seconds); it fails when the key
// is set already.
func setNXPX(ctx context.Context, rdb redis.UniversalClient, key, owner string) error {
	return rdb.Do(ctx, "set", key, owner, "px", 30000, "nx").Err()
}

// casDelete is the floor's release: compare-and-delete in one script.
var casDelete = redis.NewScript(`if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0`)

// BenchmarkUncontended measures one uncontended Lock+Unlock pair, beside
// the raw floor measured in the same run: go-redis SET NX PX plus an EVALSHA
// compare-and-delete, the least any correct Redis lock can do. Compare
// ns/op of Mutex and ReentrantMutex to Floor.
//
//	go test -run '^$' -bench Uncontended -count 6 .
func BenchmarkUncontended(b *testing.B) {
	be := benchBackend(b)
	ctx := context.Background()
	b.Run("Floor", func(b *testing.B) {
		rdb := be.Client(b)
		key, owner := redistest.UniqueName(b), "owner"
		for b.Loop() {
			if err := setNXPX(ctx, rdb, key, owner); err != nil {
				b.Fatal(err)
			}
			if err := casDelete.Run(ctx, rdb, []string{key}, owner).Err(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("Mutex", func(b *testing.B) {
		c := redlatch.New(be.Client(b))
		defer c.Close()
		m := c.Mutex(redistest.UniqueName(b))
		for b.Loop() {
			if err := m.Lock(ctx); err != nil {
				b.Fatal(err)
			}
			if err := m.Unlock(ctx); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("ReentrantMutex", func(b *testing.B) {
		c := redlatch.New(be.Client(b))
		defer c.Close()
		m := c.ReentrantMutex(redistest.UniqueName(b))
		for b.Loop() {
			if err := m.Lock(ctx); err != nil {
				b.Fatal(err)
			}
			if err := m.Unlock(ctx); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// Two references measured beside the floor, to split Mutex's distance to
// it. scriptLock is the floor's SET NX PX run inside a script: the least a
// lock pays for making its acquisition a script at all (EVALSHA, the KEYS
// and ARGV tables, the reply converted to Lua and back). bareLock and
// bareUnlock are redlatch's data model without its guarantees: a hash of
// owner, count and token with a lease, the token read from the server
// clock, and a compare-and-delete; no fence key, no request ids, no
// wake-ups.
var scriptLock = redis.NewScript(`return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])`)

// bareLock writes and replies with strings, as lua/lock.lua does: a Lua
// number given to redis.call, or turned into a string, costs about as much
// as a short command.
var (
	bareLock = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'o') then return {0, redis.call('PTTL', KEYS[1])} end
local now = redis.call('TIME')
local token = now[1] .. string.rep('0', 6 - #now[2]) .. now[2]
redis.call('HSET', KEYS[1], 'o', ARGV[1], 'c', '1', 't', token)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, token}`)
	bareUnlock = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'o') ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])`)
)

// BenchmarkUncontendedRatio interleaves the floor, Mutex and ReentrantMutex
// pair by pair, so that machine drift hits all three alike, and reports each
// one's mean time per pair and the ratios to the floor (mutex/floor,
// reentrant/floor). Beside them run the script lock and the bare
// two-script lock (see scriptLock): script/floor is the cost of a scripted
// acquisition, bare/floor that of redlatch's data model, mutex/bare that
// of its guarantees.
//
//	go test -run '^$' -bench UncontendedRatio -benchtime 5000x -count 5 .
func BenchmarkUncontendedRatio(b *testing.B) {
	be := benchBackend(b)
	ctx := context.Background()
	rdb := be.Client(b)
	c := redlatch.New(be.Client(b))
	defer c.Close()
	floorKey, scriptKey, bareKey := redistest.UniqueName(b), redistest.UniqueName(b), redistest.UniqueName(b)
	m := c.Mutex(redistest.UniqueName(b))
	rm := c.ReentrantMutex(redistest.UniqueName(b))
	var floor, mutex, reentrant, script, bare time.Duration
	for b.Loop() {
		t0 := time.Now()
		if err := setNXPX(ctx, rdb, floorKey, "owner"); err != nil {
			b.Fatal(err)
		}
		if err := casDelete.Run(ctx, rdb, []string{floorKey}, "owner").Err(); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := m.Lock(ctx); err != nil {
			b.Fatal(err)
		}
		if err := m.Unlock(ctx); err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		if err := rm.Lock(ctx); err != nil {
			b.Fatal(err)
		}
		if err := rm.Unlock(ctx); err != nil {
			b.Fatal(err)
		}
		t3 := time.Now()
		if res, err := bareLock.Run(ctx, rdb, []string{bareKey}, "owner", 30000).Int64Slice(); err != nil || res[0] != 1 {
			b.Fatal(res, err)
		}
		if err := bareUnlock.Run(ctx, rdb, []string{bareKey}, "owner").Err(); err != nil {
			b.Fatal(err)
		}
		t4 := time.Now()
		if err := scriptLock.Run(ctx, rdb, []string{scriptKey}, "owner", 30000).Err(); err != nil {
			b.Fatal(err)
		}
		if err := casDelete.Run(ctx, rdb, []string{scriptKey}, "owner").Err(); err != nil {
			b.Fatal(err)
		}
		t5 := time.Now()
		floor += t1.Sub(t0)
		script += t5.Sub(t4)
		mutex += t2.Sub(t1)
		reentrant += t3.Sub(t2)
		bare += t4.Sub(t3)
	}
	n := float64(b.N)
	b.ReportMetric(float64(floor.Microseconds())/n, "floor-µs/pair")
	b.ReportMetric(float64(mutex.Microseconds())/n, "mutex-µs/pair")
	b.ReportMetric(float64(reentrant.Microseconds())/n, "reentrant-µs/pair")
	b.ReportMetric(float64(mutex)/float64(floor), "mutex/floor")
	b.ReportMetric(float64(reentrant)/float64(floor), "reentrant/floor")
	b.ReportMetric(float64(script)/float64(floor), "script/floor")
	b.ReportMetric(float64(bare)/float64(floor), "bare/floor")
	b.ReportMetric(float64(mutex)/float64(bare), "mutex/bare")
}
