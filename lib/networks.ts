/**
 * Client networks as Postfix's `mynetworks` lists them: IPv4 and IPv6 addresses and CIDR
 * blocks (`192.0.2.0/24`, `[2001:db8::]/32` in Postfix's bracketed spelling too), matched
 * with ip-address. An IPv4-mapped IPv6 client (`::ffff:192.0.2.1`) matches the IPv4 entries
 * and an IPv4 client the mapped IPv6 ones, so a dual-stack listener sees one client one way.
 * Shared by relayControl, dkimSign and the gateway's per-client limits.
 */
import net from 'node:net';
import { Address4, Address6 } from 'ip-address';

/**
 * A membership test for a list of networks. Throws an Error naming the first entry that is
 * not an IP address or CIDR block (callers wrap it in their own DOVETAIL_ERR_INVALID_OPTIONS).
 */
export function networkList(list: readonly string[]): (ip: string) => boolean {
  const v4: Address4[] = [];
  const v6: Address6[] = [];
  for (const entry of list) {
    if (typeof entry !== 'string') throw new Error('entries must be strings');
    const s = entry.trim().replace(/^\[([^\]]+)\](\/\d+)?$/, '$1$2'); // Postfix writes [::1]/128
    let ok = false;
    try {
      if (Address4.isValid(s)) ok = v4.push(new Address4(s)) > 0;
      else if (Address6.isValid(s)) ok = v6.push(new Address6(s)) > 0;
    } catch {
      ok = false;
    }
    if (!ok) throw new Error(`${JSON.stringify(entry)} is not an IP address or CIDR block`);
  }
  if (v4.length === 0 && v6.length === 0) return () => false;
  return (ip) => {
    let a4: Address4 | undefined;
    let a6: Address6;
    if (net.isIPv4(ip)) {
      a4 = new Address4(ip);
      a6 = Address6.fromAddress4(ip);
    } else if (net.isIPv6(ip)) {
      a6 = new Address6(ip.replace(/%.*$/, ''));
      if (a6.is4()) a4 = a6.to4();
    } else {
      return false;
    }
    return (a4 !== undefined && v4.some((n) => a4.isInSubnet(n))) || v6.some((n) => a6.isInSubnet(n));
  };
}
