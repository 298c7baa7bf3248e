package redlatch_test

import (
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/redlatch/redlatch"
)

// BenchmarkHotKeyFair: the hot-key workload of BenchmarkHotKey (16
// goroutines over 2 Clients, one key, empty critical section, 2s per kind)
// for FairMutex beside Mutex. Needs a real redis-server.
//
//	go test -run '^$' -bench HotKeyFair -benchtime 1x .
func BenchmarkHotKeyFair(b *testing.B) {
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
		{"FairMutex", func(c *redlatch.Client, _ redis.UniversalClient, key string) lockUnlock {
			m := c.FairMutex(key)
			return lockUnlock{m.Lock, m.Unlock}
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
