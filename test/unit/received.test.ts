import { test } from 'node:test';
import assert from 'node:assert/strict';
import { newQueueId, receivedValue, rfc5322Date } from '../../lib/smtp/received.js';

test('queue ids: 12 characters of the vowel-free alphabet, unique, and time-ordered in their prefix', () => {
  const ids = Array.from({ length: 5000 }, () => newQueueId());
  assert.equal(new Set(ids).size, ids.length);
  for (const id of ids) assert.match(id, /^[0-9BCDFGHJKLMNPQRSTVWXYZ]{12}$/);
});

test('queue ids stay unique when the clock stands still or steps back (regression: a CI run saw a repeat)', () => {
  const realNow = Date.now;
  try {
    let t = realNow();
    Date.now = () => t;
    const ids = Array.from({ length: 3000 }, () => newQueueId()); // 3 000 ids in one "millisecond"
    t -= 5_000; // the clock steps back five seconds
    for (let i = 0; i < 3000; i++) ids.push(newQueueId());
    assert.equal(new Set(ids).size, ids.length);
    // The time part never goes backwards: ids sort in the order they were made.
    const prefixes = ids.map((id) => id.slice(0, 9));
    assert.deepEqual([...prefixes].sort(), prefixes);
  } finally {
    Date.now = realNow;
  }
});

test('RFC 5322 dates', () => {
  assert.equal(rfc5322Date(new Date(Date.UTC(2026, 10, 2, 3, 4, 5))), 'Mon, 2 Nov 2026 03:04:05 +0000');
});

test('Received: Postfix shape, TLS clause, for-clause only with one recipient, IPv6 literal', () => {
  const date = new Date(Date.UTC(2026, 10, 22, 8, 0, 0));
  const base = { helo: 'c.test', clientHostname: 'host.c.test', clientAddress: '192.0.2.1', hostname: 'mx.test', protocol: 'ESMTPS', queueId: 'Q1', tls: { version: 'TLSv1.3', cipher: 'TLS_AES_256_GCM_SHA384', bits: 256 }, date };
  assert.equal(
    receivedValue({ ...base, recipients: ['a@x.test'] }),
    'from c.test (host.c.test [192.0.2.1])\r\n\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n\tby mx.test (dovetail) with ESMTPS id Q1\r\n\tfor <a@x.test>; Sun, 22 Nov 2026 08:00:00 +0000',
  );
  assert.equal(
    receivedValue({ ...base, tls: undefined, clientHostname: '[2001:db8::1]', clientAddress: '2001:db8::1', recipients: ['a@x.test', 'b@x.test'] }),
    'from c.test (unknown [IPv6:2001:db8::1])\r\n\tby mx.test (dovetail) with ESMTPS id Q1; Sun, 22 Nov 2026 08:00:00 +0000',
  );
});
