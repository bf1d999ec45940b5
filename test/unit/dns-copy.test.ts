import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyAnswer, mailauthResolver, type DnsResolver } from '../../milters/dns.js';

test('copyAnswer: equal answers that share nothing with the original (A, TXT, MX, other shapes)', () => {
  const answers: unknown[] = [
    ['192.0.2.1', '192.0.2.2'],
    [['v=spf1 ', 'ip4:192.0.2.0/24 -all'], ['other']],
    [{ exchange: 'mx2.example.test', priority: 20 }, { exchange: 'mx1.example.test', priority: 10 }],
    [{ nested: { deep: ['x'] } }],
    [[1, 2]],
    { soa: 'not an array' },
    [],
  ];
  for (const a of answers) {
    const c = copyAnswer(a);
    assert.deepEqual(c, a);
    assert.notEqual(c, a);
    const before = structuredClone(a);
    // mailauth sorts MX lists and may write into records: the original must not change.
    if (Array.isArray(c)) {
      c.reverse();
      for (const x of c) if (Array.isArray(x)) x.push('changed');
      for (const x of c) if (x && typeof x === 'object' && !Array.isArray(x)) (x as Record<string, unknown>)['priority'] = -1;
      for (const x of c) if (x && typeof x === 'object' && 'nested' in x) ((x as { nested: { deep: string[] } }).nested.deep).push('changed');
    }
    assert.deepEqual(a, before);
  }
});

test('mailauthResolver: one query per name and type, every caller its own copy of answers and errors', async () => {
  let asked = 0;
  const resolver: DnsResolver = {
    resolve4: async () => [],
    async resolve(name: string) {
      asked++;
      if (name === 'nx.test') throw Object.assign(new Error('queryTxt ENOTFOUND nx.test'), { code: 'ENOTFOUND', hostname: name });
      return [['v=spf1 -all']];
    },
  };
  const r = mailauthResolver(resolver);
  const a = await r('example.test', 'txt');
  (a[0] as string[]).push('mutated');
  assert.deepEqual(await r('EXAMPLE.test', 'TXT'), [['v=spf1 -all']]);
  const errors: unknown[] = [];
  for (let i = 0; i < 2; i++) await r('nx.test', 'TXT').catch((e: unknown) => errors.push(e));
  assert.equal(asked, 2);
  assert.equal(errors.length, 2);
  assert.notEqual(errors[0], errors[1]);
  for (const e of errors) {
    assert.ok(e instanceof Error);
    assert.equal((e as Error & { code?: string }).code, 'ENOTFOUND');
    assert.equal((e as Error & { hostname?: string }).hostname, 'nx.test');
    assert.equal(e.message, 'queryTxt ENOTFOUND nx.test');
  }
  (errors[0] as Error & { code?: string }).code = 'CHANGED';
  assert.equal((errors[1] as Error & { code?: string }).code, 'ENOTFOUND');
});
